"""How our CPU kernels are built: the sources, the compiler flags and the id of a build.

The package's install builds them (setup.py reads this module by path, so it imports only the
standard library); `build_library` is the developer fallback that kernels.py uses when asked to
(MISTRAL_SERVE_BUILD_KERNELS=1), for a source checkout whose kernels.c changed since the install.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import shutil
import subprocess
import tempfile

HERE = Path(__file__).parent
SOURCE = HERE / "kernels.c"
HEADER = HERE / "kernels.h"
# -fvisibility=hidden: the library exports what kernels.h declares (MS_API), nothing else.
# -fno-wrapv: the install's compiler line starts with Python's own flags, -fwrapv among them, which
# makes the matmul loops slower (measured: a 256 x 576 -> 1536 bfloat16 matmul 214 against 205 us, a
# demo bfloat16 prefill of 256 tokens ~70 against ~65 ms); the kernels never rely on signed overflow
# wrapping, so they take the compiler's usual assumptions back.
COMPILE_FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-fvisibility=hidden", "-fno-wrapv")
LINK_FLAGS = ("-fopenmp",)
# the name the install gives the library, beside this module (plus Python's extension suffix)
LIBRARY_NAME = "_kernels"


def source_id() -> str:
    """The hash of the header and the source: a library built from them says the same (ms_source_id)."""
    digest = hashlib.sha256()
    for path in (HEADER, SOURCE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def source_id_macro() -> tuple[str, str]:
    """-DMS_SOURCE_ID="<id>": compiled into the library."""
    return "MS_SOURCE_ID", f'"{source_id()}"'


def find_compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("gcc") or shutil.which("cc")


def build_library(compiler: str, cache_dir: Path) -> Path:
    """Build the library into `cache_dir`, named by the id of its sources and compiler, unless it is
    there already. Raises subprocess.CalledProcessError with the compiler's output when it fails."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join((source_id(), compiler, version, *COMPILE_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir / f"{LIBRARY_NAME}-{key}.so"
    if not target.exists():
        # built beside the target and renamed into place: another process never loads half a file
        name, value = source_id_macro()
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *COMPILE_FLAGS, *LINK_FLAGS, "-shared", "-fPIC", f"-D{name}={value}",
                            "-o", str(built), str(SOURCE)], capture_output=True, text=True, check=True)
            os.replace(built, target)
    return target


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/mistral-serve/kernels (~/.cache by default), or a private folder in the temporary
    directory where that cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = base / "mistral-serve" / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    directory = Path(tempfile.gettempdir()) / f"mistral-serve-kernels-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory
