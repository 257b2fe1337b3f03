"""Omniglot's --download against a local HTTP server: checksums, atomic writes, damaged files, no network,
servers that send too slowly, too much or malformed headers."""

import hashlib
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixtures import full_disk, make_omniglot
from mamlfast import files
from mamlfast.data import DatasetError, download
from mamlfast.data.download import OMNIGLOT_MD5, download_omniglot

SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot"
PARTS = ("images_background.zip", "images_evaluation.zip")


class _TruncatingHandler(SimpleHTTPRequestHandler):
    """Announces each file's full length, then sends only half of it and hangs up."""

    def copyfile(self, source, destination):
        data = source.read()
        destination.write(data[:len(data) // 2])


class _TricklingHandler(SimpleHTTPRequestHandler):
    """Sends each file's headers, then one byte every 0.1 s."""

    def copyfile(self, source, destination):
        for byte in source.read():
            destination.write(bytes([byte]))
            time.sleep(0.1)


class _SlowHeadersHandler(SimpleHTTPRequestHandler):
    """Never finishes its headers: one byte of them every 0.1 s."""

    def do_GET(self):
        for byte in b"HTTP/1.0 200 OK\r\nServer: slow" + b"w" * 1000:
            self.wfile.write(bytes([byte]))
            time.sleep(0.1)


class _BadLengthHandler(SimpleHTTPRequestHandler):
    """Sends each file whole, announced with a malformed Content-Length."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", "abc")
        self.end_headers()
        self.wfile.write(data)


class _EndlessHandler(SimpleHTTPRequestHandler):
    """Sends zeros for ever, without a Content-Length."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(bytes(1 << 16))
        except OSError:  # the client hung up
            pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that hang up are expected here
        pass


@pytest.fixture
def serve():
    """serve(folder, handler=SimpleHTTPRequestHandler) -> the URL of ``folder`` on a local HTTP server."""
    servers = []

    def start(folder: Path, handler=SimpleHTTPRequestHandler) -> str:
        handler = type(handler.__name__, (handler,), {"log_message": lambda *args: None})
        server = _QuietServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def zips(tmp_path):
    """Small Omniglot zips to serve, and their MD5 sums as MAMLFAST_OMNIGLOT_MD5 wants them."""
    folder = make_omniglot(tmp_path / "served", zipped=True)
    return folder, ",".join(_md5(folder / part) for part in PARTS)


def test_download_fetches_both_zips_and_checks_them(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    download_omniglot(tmp_path / "root")
    for part in PARTS:
        assert (tmp_path / "root" / part).read_bytes() == (served / part).read_bytes()
    assert _contents(tmp_path / "root") == sorted(PARTS), "no temporary files left"


def _contents(root: Path) -> list[str]:
    """The names in ``root``, but the lock that downloads take turns with."""
    return sorted(p.name for p in root.iterdir() if p.name != files.LOCK_NAME)


def test_a_damaged_zip_is_replaced_and_a_good_one_kept(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    root = tmp_path / "root"
    root.mkdir()
    (root / PARTS[0]).write_bytes((served / PARTS[0]).read_bytes()[:100])  # an earlier download, cut short
    shutil.copy(served / PARTS[1], root / PARTS[1])
    kept = (root / PARTS[1]).stat().st_mtime_ns
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    download_omniglot(root)
    assert _md5(root / PARTS[0]) == _md5(served / PARTS[0])
    assert (root / PARTS[1]).stat().st_mtime_ns == kept, "a file with the right sum is not fetched again"


def test_a_truncated_download_is_never_kept(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served, _TruncatingHandler))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    with pytest.raises(DatasetError, match="images_background.zip stopped after [0-9]+ of [0-9]+ bytes"):
        download_omniglot(tmp_path / "root")
    assert _contents(tmp_path / "root") == []


def test_a_wrong_checksum_is_refused(serve, zips, tmp_path, monkeypatch):
    served, _ = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", ",".join(OMNIGLOT_MD5))  # the published sums: not these files
    with pytest.raises(DatasetError, match=f"is corrupt .*expected {OMNIGLOT_MD5[0]}"):
        download_omniglot(tmp_path / "root")
    assert _contents(tmp_path / "root") == []


@pytest.mark.parametrize("handler", [_TricklingHandler, _SlowHeadersHandler], ids=["slow body", "slow headers"])
def test_a_download_that_takes_too_long_ends_in_one_line_naming_the_url(serve, zips, tmp_path, monkeypatch,
                                                                         handler):
    served, sums = zips
    url = serve(served, handler)
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", url)
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    monkeypatch.setattr(download, "DEADLINE_SECONDS", 1)  # each read comes well within the read timeout
    started = time.monotonic()
    with pytest.raises(DatasetError) as error:
        download_omniglot(tmp_path / "root")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert f"the download of {url}/images_background.zip did not finish within 1 seconds" in message
    assert "\n" not in message
    assert _contents(tmp_path / "root") == []


def test_a_malformed_content_length_leaves_the_checksum_to_decide(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served, _BadLengthHandler))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    download_omniglot(tmp_path / "root")
    assert _contents(tmp_path / "root") == sorted(PARTS)
    assert all(_md5(tmp_path / "root" / part) == _md5(served / part) for part in PARTS)


def test_a_server_that_sends_too_much_is_cut_off(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    monkeypatch.setattr(download, "MAX_BYTES", 1000)
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    with pytest.raises(DatasetError, match=r"announces [0-9]+ bytes, more than the 1000 that an Omniglot zip"):
        download_omniglot(tmp_path / "root")
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served, _EndlessHandler))
    with pytest.raises(DatasetError, match=r"sent more than 1000 bytes"):
        download_omniglot(tmp_path / "root")
    assert _contents(tmp_path / "root") == []


def test_the_temporary_files_of_killed_downloads_are_removed(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    root = tmp_path / "root"
    root.mkdir()
    stray = root / f"{PARTS[0]}.0123abcd.tmp"
    stray.write_bytes(b"the start of a zip")
    (root / "notes.tmp").write_text("not a download's")
    download_omniglot(root)
    assert _contents(root) == sorted([*PARTS, "notes.tmp"])


def test_a_full_disk_during_a_download_is_one_line_naming_the_file(serve, zips, tmp_path, monkeypatch):
    served, sums = zips
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(served))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", sums)
    full_disk(monkeypatch, "images_background.zip")
    with pytest.raises(files.WriteError) as error:
        download_omniglot(tmp_path / "root")
    assert str(error.value) == f"could not write {tmp_path / 'root' / PARTS[0]}: no space left on device"
    assert _contents(tmp_path / "root") == []


def test_without_network_the_error_says_where_to_put_the_zips(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(DatasetError) as error:
        download_omniglot(tmp_path / "root")
    message = str(error.value)
    assert "could not download" in message and f"into {tmp_path / 'root'} by hand" in message
    assert "\n" not in message


def test_a_malformed_checksum_override_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", "abc")
    with pytest.raises(DatasetError, match="MAMLFAST_OMNIGLOT_MD5='abc'"):
        download_omniglot(tmp_path / "root")


@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason=f"the real Omniglot zips are not at {SHARED_OMNIGLOT}")
def test_download_of_the_real_omniglot(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_URL", serve(SHARED_OMNIGLOT))
    monkeypatch.setenv("MAMLFAST_OMNIGLOT_MD5", ",".join(_md5(SHARED_OMNIGLOT / part) for part in PARTS))
    download_omniglot(tmp_path / "root")
    for part in PARTS:
        assert _md5(tmp_path / "root" / part) == _md5(SHARED_OMNIGLOT / part)


def test_train_with_download_on_first_use(serve, tmp_path):
    # enough characters that the validation split (50/1623 of them) holds 5 classes
    served = make_omniglot(tmp_path / "served", alphabets=(("Alpha", 110),), evaluation=(("Beta", 60),),
                           images_per_class=2, size=20, zipped=True)
    environment = dict(MAMLFAST_OMNIGLOT_URL=serve(served), MAMLFAST_CACHE=str(tmp_path / "cache"),
                       MAMLFAST_OMNIGLOT_MD5=",".join(_md5(served / part) for part in PARTS))
    command = [sys.executable, "-m", "mamlfast", "train", "--dataset", "omniglot", "--download", "--image-size", "8",
               "--num-stages", "2", "--num-filters", "2", "--inner-steps", "1", "--eval-inner-steps", "1",
               "--meta-batch-size", "1", "--epochs", "1", "--iters-per-epoch", "1", "--eval-tasks", "2",
               "--no-progress", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env={**_base_environment(), **environment})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "cache" / "omniglot").glob("*.zip")) == sorted(PARTS)
    assert "test accuracy" in result.stdout


def _base_environment():
    import os
    return {key: value for key, value in os.environ.items() if not key.startswith("MAMLFAST_")}
