"""The oldest versions of what mamlfast runs on that it supports: each was run with the test suite
(docs/install.md#supported-versions), and CI runs them.

pip enforces Python and NumPy, stated again in pyproject.toml (a test keeps the two in step). torch
is not a dependency on purpose (the build links against the torch already installed and must never
replace it), so ``import mamlfast`` and setup.py check it; Triton, which only the triton backend
needs, is checked where that backend is chosen. This module imports nothing: setup.py reads it
before anything is built.
"""

from __future__ import annotations

import re

PYTHON = "3.10"
NUMPY = "1.26"
TORCH = "2.11"
TRITON = "3.6"
# the first setuptools with a bdist_wheel of its own, which pip runs to build without build isolation
SETUPTOOLS = "70.1"


def release(version: str) -> tuple[int, ...]:
    """The numbers a version starts with: "2.11.0+cu130" -> (2, 11, 0), "3.6.0rc1" -> (3, 6, 0)."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(number) for number in numbers.group().split(".")) if numbers else ()


def too_old(name: str, version: str, minimum: str) -> str | None:
    """None if ``version`` of ``name`` is ``minimum`` or newer, else one line that says so."""
    if release(version) >= release(minimum):
        return None
    return f"{name} {version} is older than {minimum}, the oldest that mamlfast supports"
