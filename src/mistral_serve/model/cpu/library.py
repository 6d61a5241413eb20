"""Finding and opening the kernels' shared library, and saying which fast path this process has.

The package's install builds the library beside this module (setup.py, build.py). It is opened only
when it was built from the very sources of kernels.h and kernels.c that ship beside it (its
`ms_source_id`) and its structures have the sizes that header.py reads from the header. A source
checkout whose kernels.c changed since the install can build it at run time instead, when asked
(MISTRAL_SERVE_BUILD_KERNELS=1): the developer fallback.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
import importlib.machinery
import os
from pathlib import Path
import platform
import subprocess
import sys

from mistral_serve.model.cpu import build
from mistral_serve.model.cpu.header import Function, Header

DISABLE_VARIABLE = "MISTRAL_SERVE_CPU_KERNELS"  # 0: torch's kernels only
AMX_VARIABLE = "MISTRAL_SERVE_AMX"  # 0: the vector loops even where the CPU has tile units
BUILD_VARIABLE = "MISTRAL_SERVE_BUILD_KERNELS"  # 1: build from the sources at run time (developers)


class LibraryUnavailable(Exception):
    """Why the kernels cannot be used in this process (the message says it to the operator)."""


@dataclass(frozen=True)
class KernelBackend:
    """Which CPU kernels this process runs: for the log, /ready and the model objects."""

    is_available: bool
    instruction_set: str | None = None  # "avx512" (with bfloat16 and VNNI) where available
    has_tiles: bool = False  # the int8 and bfloat16 matmuls run on the tile units (AMX)
    openmp: str | None = None  # whose OpenMP runtime the kernels run on
    origin: str | None = None  # "installed", or "built at run time"
    reason: str | None = None  # why not available

    def describe(self) -> str:
        if not self.is_available:
            return f"torch's kernels ({self.reason})"
        tiles = " + AMX tiles" if self.has_tiles else ""
        return f"ours: {self.instruction_set} bf16/VNNI{tiles}, OpenMP {self.openmp}, {self.origin}"

    def as_dict(self) -> dict:
        return {"available": self.is_available, "instruction_set": self.instruction_set, "amx_tiles": self.has_tiles,
                "openmp": self.openmp, "origin": self.origin, "reason": self.reason}


def is_switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def is_switched_on(variable: str) -> bool:
    return os.environ.get(variable, "0").strip().lower() in ("1", "true", "yes", "on")


def open_library(header: Header) -> tuple[ctypes.CDLL, str]:
    """The library and where it came from ("installed" or "built at run time"); LibraryUnavailable
    (with the reason) where there is none this process can use."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise LibraryUnavailable(f"they are written for Linux on x86-64, not {sys.platform} on {platform.machine()}")
    if is_switched_on(BUILD_VARIABLE):
        library, origin = _opened(_built_now()), "built at run time"
    else:
        path = installed_path()
        if path is None:
            raise LibraryUnavailable(
                "they were not built when the package was installed (was there a C compiler?): reinstall it "
                f"with gcc present, or set {BUILD_VARIABLE}=1 to build them at run time")
        library, origin = _opened(path), "installed"
    built_from = bind(library, header.functions["ms_source_id"])().decode()
    expected = build.source_id()
    if built_from != expected:
        raise LibraryUnavailable(
            f"the installed library was built from other sources ({built_from}) than those beside it "
            f"({expected}): reinstall the package, or set {BUILD_VARIABLE}=1")
    _check_structures(library, header)
    return library, origin


def installed_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(build.LIBRARY_NAME + suffix)
        if path.exists():
            return path
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def openmp_of(library: ctypes.CDLL) -> Path | None:
    """The OpenMP runtime that `library`'s calls go to (the file that defines the omp_get_num_threads it
    binds to), or None where it has none. The kernels' and torch's are the same file when they share
    one runtime; other packages may bring their own (sentencepiece's wheel does), used only by them."""
    try:
        function = library.omp_get_num_threads
    except AttributeError:
        return None
    info = _DlInfo()
    if not ctypes.CDLL(None).dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)):
        return None
    return Path(info.dli_fname.decode()).resolve()


def _opened(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise LibraryUnavailable(f"{path.name} cannot be loaded: {error}") from None


def _built_now() -> Path:
    compiler = build.find_compiler()
    if compiler is None:
        raise LibraryUnavailable(f"{BUILD_VARIABLE}=1, but there is no C compiler (set CC, or install gcc)")
    try:
        return build.build_library(compiler, build.cache_dir())
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        raise LibraryUnavailable(f"building {build.SOURCE.name} failed: {str(detail).strip()[-2000:]}") from None


def bind(library: ctypes.CDLL, declared: Function):
    """The library's function with its argument and result types from the header (without them ctypes
    would take any argument and return an int)."""
    try:
        function = getattr(library, declared.name)
    except AttributeError:
        raise LibraryUnavailable(f"the library has no {declared.name}: it was built from older sources") from None
    function.argtypes, function.restype = list(declared.argtypes), declared.restype
    return function


def _check_structures(library: ctypes.CDLL, header: Header) -> None:
    """The structures as header.py read them have the sizes the compiler gave them."""
    struct_size = bind(library, header.functions["ms_struct_size"])
    for name, struct in header.structs.items():
        size = struct_size(name.encode())
        if size != ctypes.sizeof(struct):
            raise LibraryUnavailable(f"the structure {name} is {size} bytes in the library but "
                                     f"{ctypes.sizeof(struct)} as read from kernels.h")
