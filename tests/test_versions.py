"""The oldest supported versions: one list (mamlfast/versions.py), the same in pyproject.toml, the README's set-up
command and CI, and one line wherever an older one is met."""

import importlib
import platform
import re
import sys
from pathlib import Path

import numpy
import pytest
import torch

import mamlfast
from mamlfast import versions
from mamlfast.ops import backends

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("version, numbers", [
    ("2.11.0+cu130", (2, 11, 0)), ("3.6.0rc1", (3, 6, 0)), ("2.12.0.dev20260101", (2, 12, 0)),
    ("1.26", (1, 26)), ("unknown", ()),
])
def test_release_is_the_numbers_a_version_starts_with(version, numbers):
    assert versions.release(version) == numbers


def test_too_old_names_the_version_and_the_oldest_supported():
    assert versions.too_old("torch", "2.10.2+cpu", "2.11") == ("torch 2.10.2+cpu is older than 2.11, the oldest that "
                                                               "mamlfast supports")
    for newer in ("2.11", "2.11.0", "2.11.0a0+git1234", "2.14.1+cu130", "3.0"):
        assert versions.too_old("torch", newer, "2.11") is None


def test_pyproject_states_the_same_minimums_for_pip():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = "(.*)"$', pyproject, re.MULTILINE).group(1) == f">={versions.PYTHON}"
    dependencies = re.search(r"^dependencies = \[(.*)\]$", pyproject, re.MULTILINE).group(1)
    assert f'"numpy>={versions.NUMPY}"' in dependencies.split(", ")
    build_requires = re.search(r"^requires = \[(.*)\]$", pyproject, re.MULTILINE).group(1)
    assert build_requires == f'"setuptools>={versions.SETUPTOOLS}", "ninja"'


def test_the_readme_set_up_command_installs_the_build_tools_and_ci_runs_it_verbatim():
    build_tools = f"'setuptools>={versions.SETUPTOOLS}' ninja"
    set_up = f"pip install torch {build_tools} && pip install --no-build-isolation -e '.[test]'"
    assert f"    {set_up} && mamlfast train\n" in (ROOT / "README.md").read_text()
    assert f"\n{set_up}\n" in (ROOT / ".ci" / "run").read_text()


def test_the_install_page_states_every_minimum():
    stated = f"Python {versions.PYTHON}, NumPy {versions.NUMPY}, torch {versions.TORCH} and Triton {versions.TRITON}"
    assert stated in " ".join((ROOT / "docs" / "install.md").read_text().split())


def test_importing_mamlfast_with_an_older_torch_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    monkeypatch.delitem(sys.modules, "mamlfast")  # imported again; the original comes back after the test
    with pytest.raises(ImportError) as refusal:
        importlib.import_module("mamlfast")
    assert str(refusal.value) == ("torch 2.10.0 is older than 2.11, the oldest that mamlfast supports: install a "
                                  "newer torch (https://pytorch.org), then reinstall mamlfast")


def test_a_too_old_triton_makes_the_triton_backend_unusable_saying_why(monkeypatch):
    fake_triton = type(sys)("triton")
    fake_triton.__version__ = "3.5.1"
    monkeypatch.setitem(sys.modules, "triton", fake_triton)
    backends._triton_problem.cache_clear()
    try:
        reason = backends.unavailable_reason("triton", torch.device("cuda"))
    finally:
        backends._triton_problem.cache_clear()
    assert reason == ("Triton 3.5.1 is older than 3.6, the oldest that mamlfast supports: install the Triton that "
                      "your torch asks for")


def test_info_states_the_versions_installed_and_the_oldest_supported(capsys):
    from mamlfast.cli import main
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"mamlfast {mamlfast.__version__}: Python {platform.python_version()}, NumPy "
                               f"{numpy.__version__}, torch {torch.__version__}, Triton ")
    assert lines[1] == "the oldest versions supported: Python 3.10, NumPy 1.26, torch 2.11, Triton 3.6"
