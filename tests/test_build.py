"""The build's choice of sources, compiler and CUDA toolkit (setup.py), and what the package says when the
extension or its CUDA kernels are missing."""

import os
import runpy
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mamlfast.ops import extension

SETUP = runpy.run_path(str(Path(__file__).parent.parent / "setup.py"), run_name="setup_under_test")
find_cuda_toolkit = SETUP["find_cuda_toolkit"]
ROOT = Path(__file__).parent.parent


def _executable(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _toolkit(folder: Path) -> Path:
    """A folder that looks like a CUDA toolkit: the runtime header and an nvcc."""
    (folder / "include").mkdir(parents=True)
    (folder / "include" / "cuda_runtime_api.h").write_text("")
    _executable(folder / "bin" / "nvcc", "exit 0\n")
    return folder


def test_a_wrapper_nvcc_leads_to_the_toolkit_it_runs(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    # like /usr/local/bin/nvcc that execs the real one: the folder above it holds no CUDA headers
    _executable(tmp_path / "wrapper" / "bin" / "nvcc", f"echo '#$ TOP={toolkit}/bin/..' >&2\n")
    found, how = find_cuda_toolkit({"PATH": str(tmp_path / "wrapper" / "bin")}, conventional=tmp_path / "none")
    assert found == toolkit.resolve() and "reported by" in how


def test_the_folder_above_nvcc_is_taken_when_it_is_a_toolkit(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda")
    found, how = find_cuda_toolkit({"PATH": str(toolkit / "bin")}, conventional=tmp_path / "none")
    assert found == toolkit and "the folder above" in how


def test_a_cuda_home_without_headers_is_refused_with_the_reason(tmp_path):
    _toolkit(tmp_path / "real")
    (tmp_path / "empty").mkdir()
    found, why = find_cuda_toolkit({"CUDA_HOME": str(tmp_path / "empty"), "PATH": str(tmp_path / "real" / "bin")},
                                   conventional=tmp_path / "real")
    assert found is None and why == f"CUDA_HOME is set, but {tmp_path / 'empty'} has no include/cuda_runtime_api.h"


def test_no_toolkit_at_all(tmp_path):
    found, why = find_cuda_toolkit({"PATH": str(tmp_path)}, conventional=tmp_path / "none")
    assert found is None and "nvcc not on PATH" in why and str(tmp_path / "none") in why


def test_the_conventional_folder_is_the_last_resort(tmp_path):
    toolkit = _toolkit(tmp_path / "usr-local-cuda")
    found, how = find_cuda_toolkit({"PATH": str(tmp_path / "nothing")}, conventional=toolkit)
    assert found == toolkit and how == "the conventional location"


def _includes(source: Path) -> set[str]:
    """Every header ``source`` includes, following the local ones ("...")."""
    found = set()
    for line in source.read_text().splitlines():
        if line.startswith("#include"):
            header = line.split()[1]
            found.add(header)
            if header.startswith('"'):
                found |= _includes(source.parent / header.strip('"'))
    return found


def test_every_build_compiles_the_cpu_kernels_and_cuda_adds_its_own():
    cpu, cuda = SETUP["read_sources"]()
    assert set(cpu) == {"csrc/library.cpp", "csrc/batch_norm_cpu.cpp", "csrc/lslr_cpu.cpp", "csrc/max_pool_cpu.cpp",
                        "csrc/memory_pool_cpu.cpp"}
    assert set(cuda) == {"csrc/bindings.cpp", "csrc/batch_norm.cu", "csrc/lslr.cu"}
    assert all((ROOT / source).is_file() for source in cpu + cuda)
    # a build without a CUDA toolkit compiles the CPU sources: no CUDA header may reach them
    for source in cpu:
        assert not [header for header in _includes(ROOT / source) if "cuda" in header.lower()], source


def test_the_compiler_is_cxx_where_set(tmp_path):
    compiler = _executable(tmp_path / "bin" / "my-g++", "exit 0\n")
    assert SETUP["cxx_compiler"]({"CXX": "my-g++ -pipe", "PATH": str(tmp_path / "bin")}) == str(compiler)
    assert SETUP["cxx_compiler"]({"PATH": str(tmp_path / "nothing")}) is None


@pytest.mark.parametrize("record, error, expected", [
    (dict(extension=None, reason="no C++ compiler found", torch="2.13.0"), "No module named 'mamlfast._C'",
     "the extension mamlfast._C is not built: no C++ compiler found"),
    (dict(extension="cuda", torch="0.0.1"), "undefined symbol: _ZN3c10", "built for torch 0.0.1, running torch"),
    (None, "No module named 'mamlfast._C'", "installed without a build record"),
])
def test_a_missing_extension_is_explained_by_the_build_record(record, error, expected):
    message = extension._why_not_loaded(ImportError(error), record)
    assert expected in message and "likely" not in message


def test_an_incomplete_build_of_this_torch_is_named():
    import torch
    record = dict(extension="cuda", torch=torch.__version__)
    assert "build did not complete" in extension._why_not_loaded(ImportError("No module named x"), record)
    assert "did not load (undefined symbol" in extension._why_not_loaded(ImportError("undefined symbol"), record)


def test_missing_cuda_kernels_are_explained_by_the_build_record(monkeypatch):
    import torch

    from mamlfast import ops
    if extension.load_error():
        pytest.skip(extension.load_error())
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: key != "CUDA")
    monkeypatch.setattr(extension, "build_record",
                        lambda: dict(extension="cpu", reason="torch 2.14.1 is a CPU build (install ...)"))
    expected = "mamlfast._C was built without its CUDA kernels: torch 2.14.1 is a CPU build (install ...)"
    assert extension.cuda_kernels_error() == expected
    assert ops.availability(torch.device("cuda"))["cuda"] == expected


def _module(name: str, **attributes):
    module = type(sys)(name)
    module.__dict__.update(attributes)
    return module


@pytest.mark.parametrize("setuptools_version, wheel, missing", [
    ("70.1.0", False, None), ("84.2.1", False, None), ("65.5.0", True, None),
    ("65.5.0", False, "setuptools 65.5.0 cannot build mamlfast, which needs setuptools 70.1 or newer (or 64 or newer "
                      "with the package wheel)"),
    ("63.4.3", True, "setuptools 63.4.3 cannot build mamlfast, which needs setuptools 70.1 or newer (or 64 or newer "
                     "with the package wheel)"),
    (None, True, "setuptools is not installed"),
])
def test_the_build_tools_that_can_build_mamlfast(monkeypatch, setuptools_version, wheel, missing):
    # None in sys.modules: not installed (importing it raises ImportError)
    monkeypatch.setitem(sys.modules, "setuptools", setuptools_version and _module("setuptools",
                                                                                  __version__=setuptools_version))
    monkeypatch.setitem(sys.modules, "wheel", _module("wheel") if wheel else None)
    assert SETUP["build_tools_problem"]() == missing


def test_setup_run_without_its_build_tools_says_in_one_line_what_to_install(tmp_path):
    (tmp_path / "setuptools").mkdir()
    (tmp_path / "setuptools" / "__init__.py").write_text("raise ImportError('No module named setuptools')\n")
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT,
                            env=environ, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("mamlfast: setuptools is not installed: pip install torch 'setuptools>=70.1' ninja "
                             "installs what the build needs, beside the torch you have and within its requirements, "
                             "then build again\n")


def test_setup_refuses_an_older_torch_in_one_line(monkeypatch):
    import torch
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    record = SETUP["BUILD_RECORD"].read_bytes() if SETUP["BUILD_RECORD"].exists() else None
    with pytest.raises(SystemExit) as refusal:
        SETUP["extension_build"]()
    assert str(refusal.value) == (
        "mamlfast: torch 2.10.0 is older than 2.11, the oldest that mamlfast supports: install a newer torch "
        "(https://pytorch.org), then reinstall mamlfast with pip install --no-build-isolation -e .")
    assert (SETUP["BUILD_RECORD"].read_bytes() if SETUP["BUILD_RECORD"].exists() else None) == record


def test_the_ninja_of_the_python_package_is_put_on_path(monkeypatch, tmp_path):
    fake_ninja = type(sys)("ninja")
    fake_ninja.BIN_DIR = str(tmp_path / "venv-bin")
    monkeypatch.setitem(sys.modules, "ninja", fake_ninja)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert SETUP["find_ninja"]() and os.environ["PATH"].split(os.pathsep) == [fake_ninja.BIN_DIR, str(tmp_path / "bin")]
    monkeypatch.setitem(sys.modules, "ninja", None)  # not installed
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert not SETUP["find_ninja"]()
    _executable(tmp_path / "bin" / "ninja", "exit 0\n")
    assert SETUP["find_ninja"]()
