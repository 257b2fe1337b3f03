"""The decoded-images cache: one memory-mapped file per data set, with a header and checksums,
written once while other processes wait, shared by every process, rebuilt when damaged."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import mamlfast
from fixtures import make_folder, make_omniglot
from mamlfast.data import cache, folder, load_dataset
from mamlfast.data.omniglot import load_omniglot

CFG = mamlfast.MAMLConfig.preset("mini-imagenet-5w1s", image_size=16, k_query=2)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))


def _cache_file() -> Path:
    (path,) = cache.cache_dir().glob(f"*{cache.SUFFIX}")
    return path


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        assert handle.readline() == cache.MAGIC
        _, length, data_offset = handle.readline().split()
        return json.loads(handle.read(int(length))), int(data_offset)


def _mapping(address: int) -> str:
    """The line of /proc/self/maps whose range holds ``address``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, stop = (int(a, 16) for a in line.split()[0].split("-"))
        if start <= address < stop:
            return line
    raise AssertionError(f"{address:#x} is in no mapping")


def test_one_mapped_file_with_a_header_naming_source_and_options(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    dataset = load_dataset("folder", CFG, root)
    path = _cache_file()
    header, data_offset = _header(path)
    assert header["source"] == dict(root=str(root), split_file=None)
    assert header["options"] == dict(image_size=16, mode="RGB")
    assert header["shape"] == [64, 3, 16, 16] and header["counts"] == [4] * 16
    assert header["classes"] == [str(root / split / f"{split}-class{c}") for split, count in
                                 (("train", 6), ("val", 5), ("test", 5)) for c in range(count)]
    assert data_offset % 4096 == 0 and path.stat().st_size == data_offset + 64 * 3 * 16 * 16
    pool = dataset.splits["val"].pool
    assert all(split.pool is pool for split in dataset.splits.values()), "the splits are views of one pool"
    if sys.platform == "linux":
        mapping = _mapping(pool.data_ptr())
        assert mapping.split()[1].startswith("r--") and mapping.endswith(str(path)), mapping

    def not_again(*args, **kwargs):
        raise AssertionError("decoded again, though the cache file is valid")
    monkeypatch.setattr(folder, "decode_classes", not_again)
    again = load_dataset("folder", CFG, root)
    for split in dataset.splits:
        assert torch.equal(again.splits[split].images, dataset.splits[split].images)
    assert again.mean == dataset.mean and again.std == dataset.std, "statistics from the header"


def _replace(path: Path, data: bytes) -> None:
    """Give ``path`` new contents in a new file: changing a mapped file in place would take its
    pages from under the mappings (SIGBUS), and mamlfast never does."""
    Path(f"{path}.new").write_bytes(data)
    os.replace(f"{path}.new", path)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    header, data_offset = _header(path)
    if how == "an image byte":
        data[data_offset + 1000] ^= 0x01
    elif how == "a header byte":
        at = data.index(b'"classes"')
        data[at + 20] ^= 0x01
    elif how == "truncated":
        del data[-100:]
    elif how == "not a cache file":
        data = bytearray(b"damaged")
    _replace(path, bytes(data))


@pytest.mark.parametrize("how, problem", [
    ("an image byte", "is damaged (its images do not match their checksums)"),
    ("a header byte", "is unreadable (its header does not match its checksum)"),
    ("truncated", "is unreadable (mmap length is greater than file size)"),
    ("not a cache file", "is unreadable (not a mamlfast cache file)"),
    ("another source's", "is for another source or another version of mamlfast"),
])
def test_a_damaged_or_mismatched_cache_is_rebuilt_with_a_warning(tmp_path, caplog, how, problem):
    root = make_omniglot(tmp_path / "omniglot")
    first = load_omniglot(root, image_size=16)
    path = _cache_file()
    if how == "another source's":
        load_omniglot(root, image_size=20)
        (other,) = set(cache.cache_dir().glob(f"*{cache.SUFFIX}")) - {path}
        other.replace(path)
    else:
        _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.cache"):
        again = load_omniglot(root, image_size=16)
    for split in first:
        assert torch.equal(again[split].images, first[split].images) and again[split].names == first[split].names
    assert f"cache file {path} {problem}: decoding the images again" in caplog.text
    caplog.clear()
    load_omniglot(root, image_size=16)
    assert not caplog.text, "replaced by the rebuilt one"


def test_a_cache_folder_that_cannot_be_written_costs_a_decoding_in_memory(tmp_path, monkeypatch, caplog):
    root = make_omniglot(tmp_path / "omniglot")
    first = load_omniglot(root, image_size=16)
    _replace(_cache_file(), b"damaged")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(cache, "waiting_lock", read_only)
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.cache"):
        again = load_omniglot(root, image_size=16)
    for split in first:
        assert torch.equal(again[split].images, first[split].images)
    assert "could not write the cache file" in caplog.text and "Read-only file system" in caplog.text
    assert _cache_file().read_bytes() == b"damaged"


def test_a_full_disk_while_writing_the_cache_costs_a_decoding_in_memory_and_leaves_no_file(tmp_path, monkeypatch,
                                                                                            caplog):
    root = make_omniglot(tmp_path / "omniglot")
    real_open = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def write(self, data):
            if self.handle.tell() + len(data) > 4096:  # the disk fills after the first page
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FullDisk(real_open(*args, **kwargs)))
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.cache"):
        decoded = load_omniglot(root, image_size=16)
    monkeypatch.undo()
    assert "could not write the cache file" in caplog.text and "(No space left on device)" in caplog.text
    assert not list(cache.cache_dir().glob(f"*{cache.SUFFIX}*"))  # no cache file, no temporary
    again = load_omniglot(root, image_size=16)  # decoded and cached now that there is room
    for split in decoded:
        assert torch.equal(again[split].images, decoded[split].images)
    _cache_file()


@pytest.mark.parametrize("sizes", [[3500], [999, 1, 1000, 1500], [1000, 1000], [0, 7], []])
def test_chunk_checksums_of_a_stream_equal_those_of_the_whole(monkeypatch, sizes):
    monkeypatch.setattr(cache, "CHUNK_BYTES", 1000)
    data = np.random.default_rng(0).integers(0, 256, sum(sizes), dtype=np.uint8)
    stream, start = cache._ChunkChecksums(), 0
    for size in sizes:
        stream.update(memoryview(data[start:start + size]))
        start += size
    assert stream.values() == cache._chunk_checksums(data)
    assert len(stream.values()) == -(-len(data) // 1000)


def test_a_cache_of_many_chunks_and_blocks_reads_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache, "CHUNK_BYTES", 4096)  # 64 images of 768 bytes: 12 chunks
    monkeypatch.setattr(cache, "BLOCK_IMAGES", 3)  # classes of 4 images: written in 2 blocks each
    root = make_folder(tmp_path / "data")
    dataset = load_dataset("folder", CFG, root)
    header, _ = _header(_cache_file())
    assert len(header["crc32"]) == 12
    pixels = dataset.splits["train"].images.double() / 255  # [N, C, H, W]
    torch.testing.assert_close(torch.tensor(dataset.mean, dtype=torch.float64), pixels.mean((0, 2, 3)),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(dataset.std, dtype=torch.float64), pixels.std((0, 2, 3), unbiased=False),
                               rtol=1e-10, atol=0)
    with monkeypatch.context() as whole_classes:
        whole_classes.setattr(cache, "BLOCK_IMAGES", 256)
        whole_classes.setenv("MAMLFAST_CACHE", str(tmp_path / "other-cache"))
        written_whole = load_dataset("folder", CFG, root)
    for split in dataset.splits:
        assert torch.equal(written_whole.splits[split].images, dataset.splits[split].images)
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.cache"):
        again = load_dataset("folder", CFG, root)
    assert not caplog.text and torch.equal(again.splits["test"].images, dataset.splits["test"].images)
    _damage(_cache_file(), "an image byte")
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.cache"):
        load_dataset("folder", CFG, root)
    assert "do not match their checksums" in caplog.text


# Each process: decoding waits until both have started and then holds the lock a while, so that
# the other finds it held; after loading, both hold the mapping while each reads its own smaps.
PROCESS = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import mamlfast
    from mamlfast.data import folder, load_dataset

    root, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def wait_for(path):
        while not path.exists():
            time.sleep(0.01)

    decodings = []
    decode_classes = folder.decode_classes
    def slowly(*args, **kwargs):
        decodings.append(1)
        wait_for(Path(f"{other}.started"))
        time.sleep(1.0)
        return decode_classes(*args, **kwargs)
    folder.decode_classes = slowly

    cfg = mamlfast.MAMLConfig.preset("mini-imagenet-5w1s", image_size=16, k_query=2)
    Path(f"{me}.started").touch()
    dataset = load_dataset("folder", cfg, root)
    pool = dataset.splits["train"].pool
    total = int(pool.sum())  # reads every page of the mapping
    Path(f"{me}.loaded").touch()
    wait_for(Path(f"{other}.loaded"))
    rss = pss = 0
    mapped = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            mapped = line.endswith(".images")
        elif mapped and line.startswith(("Rss:", "Pss:")):
            kib = int(line.split()[1])
            rss, pss = (rss + kib, pss) if line.startswith("Rss:") else (rss, pss + kib)
    Path(f"{me}.measured").touch()
    wait_for(Path(f"{other}.measured"))
    print(json.dumps(dict(decodings=len(decodings), total=total, rss=rss, pss=pss,
                          nbytes=pool.numel())))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_two_processes_started_at_once_decode_once_and_share_the_pages(tmp_path):
    root = make_folder(tmp_path / "data", classes=(("train", 30), ("val", 5), ("test", 5)), images_per_class=8)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MAMLFAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    names = [tmp_path / "a", tmp_path / "b"]
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS, str(root), str(me), str(other)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for me, other in (names, names[::-1])]
    results, errors = [], []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
        errors.append(err)
    assert sorted(r["decodings"] for r in results) == [0, 1], "one process decoded, the other waited for it"
    assert sum("waiting for pid" in err for err in errors) == 1, errors
    assert results[0]["total"] == results[1]["total"]
    (path,) = (tmp_path / "cache").glob(f"*{cache.SUFFIX}")
    assert not list((tmp_path / "cache").glob("*.tmp"))
    for result in results:
        # the images are resident in each process, and each is charged half of them: one copy
        assert result["rss"] * 1024 >= result["nbytes"], result
        assert result["pss"] <= 0.55 * result["rss"], result
