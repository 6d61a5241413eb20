"""Builds our CPU kernels (src/mistral_serve/model/cpu/kernels.c) when the package is installed, so that
the server never runs a compiler. Everything else about the package is in pyproject.toml.

The kernels are an accelerator, not a requirement: the extension is optional, so an install on a
machine without a C compiler still succeeds (setuptools prints why the build failed), and the server
says at WARNING which fast path is missing. They are written for x86-64 (AVX-512 and AMX intrinsics,
each function with its own target attributes, the variant chosen at run time), so other machines
skip the build.
"""

import importlib.util
from pathlib import Path
import platform
import sys

from setuptools import Extension, setup

CPU = Path("src/mistral_serve/model/cpu")


def load_build_rules():
    """cpu/build.py (sources, flags, the build's id), read by path: the package itself needs torch,
    which the build environment does not have."""
    spec = importlib.util.spec_from_file_location("kernels_build", CPU / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_kernels() -> list[Extension]:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    build = load_build_rules()
    # a shared library that kernels.py loads with ctypes: not a Python module, the name only gives
    # it its place in the package
    return [Extension(f"mistral_serve.model.cpu.{build.LIBRARY_NAME}", sources=[str(CPU / build.SOURCE.name)],
                      depends=[str(CPU / build.HEADER.name)], define_macros=[build.source_id_macro()],
                      extra_compile_args=list(build.COMPILE_FLAGS), extra_link_args=list(build.LINK_FLAGS),
                      optional=True)]


setup(ext_modules=cpu_kernels())
