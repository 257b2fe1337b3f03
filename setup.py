"""Build of mamlfast. The pure-Python package needs nothing compiled; csrc/ holds CUDA kernels."""

from setuptools import setup

setup()
