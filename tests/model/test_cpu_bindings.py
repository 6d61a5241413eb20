"""How our CPU kernels are built, bound and refused: the install builds them, the header is the one
declaration both sides read, a wrong call raises in Python, and a missing fast path says so at WARNING."""

import ctypes
import logging
import os
from pathlib import Path
import platform
import subprocess
import sys

import pytest
import torch

from mistral_serve.model.cpu import build, kernels as cpu_kernels, library
from mistral_serve.model.cpu.header import HeaderError, read_header
from tests.model.helpers import needs_kernels

ON_X86_LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
needs_compiler = pytest.mark.skipif(not ON_X86_LINUX or build.find_compiler() is None,
                                    reason="the kernels build on Linux x86-64 with a C compiler; none here")


@needs_compiler
def test_the_install_built_the_kernels_from_the_sources_beside_them():
    """Where a compiler is, the package's install must have built the library (a broken build must not
    pass as a quiet fallback to torch's kernels), from exactly the sources that ship with it."""
    assert library.installed_path() is not None, "the install did not build the kernels"
    _, origin = library.open_library(cpu_kernels.HEADER)
    assert origin == "installed"


def test_installing_without_a_compiler_still_succeeds(tmp_path):
    """The extension is optional: a build whose compiler is missing warns and installs the rest."""
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "temp")],
        cwd=root, capture_output=True, text=True, env={**os.environ, "CC": str(tmp_path / "no-such-compiler")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list((tmp_path / "lib").rglob("_kernels*"))


@needs_compiler
def test_the_developer_fallback_builds_the_same_library(tmp_path):
    path = build.build_library(build.find_compiler(), tmp_path)
    built = ctypes.CDLL(str(path))
    built.ms_source_id.restype = ctypes.c_char_p
    assert built.ms_source_id().decode() == build.source_id()
    assert all(hasattr(built, name) for name in cpu_kernels.HEADER.functions)


@needs_compiler
def test_a_library_built_from_other_sources_is_refused(tmp_path, monkeypatch):
    stale = tmp_path / "_kernels.so"
    subprocess.run([build.find_compiler(), *build.COMPILE_FLAGS, *build.LINK_FLAGS, "-shared", "-fPIC",
                    '-DMS_SOURCE_ID="0000000000000000"', "-o", str(stale), str(build.SOURCE)], check=True)
    monkeypatch.setattr(library, "installed_path", lambda: stale)
    with pytest.raises(library.LibraryUnavailable, match="built from other sources"):
        library.open_library(cpu_kernels.HEADER)


def test_a_missing_library_is_a_warning_that_says_why(monkeypatch, caplog):
    monkeypatch.setattr(library, "installed_path", lambda: None)
    cpu_kernels.forget_loaded()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert cpu_kernels.load() is None
        assert not cpu_kernels.backend().is_available
    finally:
        cpu_kernels.forget_loaded()
    warning, = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "not built when the package was installed" in warning.getMessage()


def test_the_header_parser_refuses_what_it_cannot_map(tmp_path):
    header = tmp_path / "kernels.h"
    header.write_text("typedef struct { double x; } Odd;\nMS_API int ms_f(Odd *o);\n")
    with pytest.raises(HeaderError, match="double"):
        read_header(header)


# every binding, called right, then wrong: a Python exception every time, never a crash

def bf16(*shape):
    return torch.zeros(shape, dtype=torch.bfloat16)


def int64(*values):
    return torch.tensor(values, dtype=torch.int64)


def decode_shape():
    return cpu_kernels.DecoderShape(hidden=32, inner=64, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                                    window=0, eps=1e-5, scale=0.1)


GOOD_CALLS = {
    "int4_linear": lambda: dict(x=bf16(2, 64), weight=torch.zeros(1, 16, 2, 32, dtype=torch.uint8),
                                scales_offsets=torch.zeros(1, 2, 4, 16), group_size=32, out_features=32),
    "int8_linear": lambda: dict(x=bf16(2, 64), weight=torch.zeros(1, 16, 2, 64, dtype=torch.int8),
                                scales=torch.ones(32), weight_sums=torch.zeros(32, dtype=torch.int32), input_passes=2),
    "bf16_linear": lambda: dict(x=bf16(2, 64), weight=bf16(1, 32, 2, 32), out_features=32),
    "paged_decode_attention": lambda: dict(q=bf16(2, 4, 32), k_cache=bf16(4, 16, 2, 32), v_cache=bf16(4, 16, 2, 32),
                                           block_tables=int64([0, 1], [2, 3]), context_lens=int64(1, 1),
                                           sliding_window=None, scale=0.1),
    "rms_norm": lambda: dict(x=bf16(2, 32), weight=bf16(32), eps=1e-5),
    "silu_and_mul": lambda: dict(gate_up=bf16(2, 64)),
    "rotary_and_cache": lambda: dict(qkv=bf16(2, 8, 32), num_heads=4, num_kv_heads=2, cos=bf16(2, 32),
                                     signed_sin=bf16(2, 32), k_cache=bf16(4, 16, 2, 32), v_cache=bf16(4, 16, 2, 32),
                                     slot_mapping=int64(0, 1)),
    "decode_layers": lambda: dict(layers=(cpu_kernels.LayerWeights * 0)(), shape=decode_shape(), x=bf16(2, 32),
                                  cos=bf16(2, 32), signed_sin=bf16(2, 32), slot_mapping=int64(0, 1),
                                  block_tables=int64([0], [1]), context_lens=int64(1, 1)),
}


def wrong_versions(call: dict):
    """(what is wrong, the call with it): each tensor in another dtype, every size one larger (some
    sizes are free alone, like a matmul's rows, but not all of them together), one more dimension,
    not contiguous."""
    for name, value in call.items():
        if not isinstance(value, torch.Tensor):
            continue
        other = torch.float64 if value.dtype != torch.float64 else torch.float32
        yield f"{name} dtype", {**call, name: value.to(other)}
        yield f"{name} shape", {**call, name: torch.zeros([size + 1 for size in value.shape], dtype=value.dtype)}
        yield f"{name} dims", {**call, name: value.unsqueeze(0)}
        strided = value.unsqueeze(-1).expand(*value.shape, 2).contiguous()[..., 0]  # same shape, stride 2
        yield f"{name} not contiguous", {**call, name: strided}
    yield "not a tensor", {**call, next(iter(call)): [[0.0]]}


def test_every_binding_has_a_checked_call():
    bound = {name.removeprefix("ms_") for name in cpu_kernels.HEADER.functions}
    internals = {"source_id", "struct_size", "cpu_supported", "enable_amx"}
    assert bound - internals == set(GOOD_CALLS)


@needs_kernels
@pytest.mark.parametrize("method", sorted(GOOD_CALLS))
def test_every_binding_refuses_a_wrong_call_with_a_python_exception(method):
    kernels = cpu_kernels.load()
    getattr(kernels, method)(**GOOD_CALLS[method]())  # the call is right as it stands
    for what, call in wrong_versions(GOOD_CALLS[method]()):
        with pytest.raises((TypeError, ValueError)):
            getattr(kernels, method)(**call)
            pytest.fail(f"{method} took a wrong {what}")


@needs_kernels
def test_decode_layers_refuses_what_is_not_its_structures():
    call = GOOD_CALLS["decode_layers"]()
    with pytest.raises(TypeError, match="LayerWeights"):
        cpu_kernels.load().decode_layers(**{**call, "layers": (cpu_kernels.LinearWeights * 1)()})
    with pytest.raises(TypeError, match="DecoderShape"):
        cpu_kernels.load().decode_layers(**{**call, "shape": object()})


@needs_kernels
def test_the_kernels_and_torch_share_one_openmp_runtime_and_team():
    """torch's wheel ships libgomp.so.1 and the kernels need that soname, so they bind to torch's runtime
    and, called from torch's thread, add no threads of their own."""
    kernels = cpu_kernels.load()
    x, weight = torch.randn(64, 256).bfloat16(), torch.randn(256, 256).bfloat16()
    torch.nn.functional.linear(x, weight)  # torch's OpenMP team is up
    threads_with_torch = len(os.listdir("/proc/self/task"))
    kernels.rms_norm(torch.randn(64, 256).bfloat16(), torch.ones(256, dtype=torch.bfloat16), 1e-5)
    assert len(os.listdir("/proc/self/task")) <= threads_with_torch
    assert cpu_kernels.backend().openmp.startswith("torch's"), cpu_kernels.backend().openmp
