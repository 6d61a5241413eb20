"""Our CPU kernels (cpu_kernels.c): built here, checked against exact references and torch's kernels."""

import logging

import pytest
import torch

from mistral_serve.model import cpu_kernels
from mistral_serve.model.cpu_kernels import unpack_torch_int4
from mistral_serve.model.loader import load_model
from mistral_serve.model.packed import pack_linears
from mistral_serve.model.quant import Int4Linear, Int8Linear, W8A8Linear, can_pack_int8, quantize_int4, quantize_int8
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.model.test_quant import prefill_logits

needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None, reason="the CPU kernels cannot run here (see the log)")


def test_kernels_build_on_this_machine():
    """CI runs on AVX-512 machines with gcc: there the kernels must build, not silently fall back."""
    reason = cpu_kernels._cannot_build()
    if reason is None and cpu_kernels.load() is None:
        pytest.fail("a C compiler is there but the kernels did not load: see the log")


def test_switched_off_by_the_environment(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    cpu_kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
            assert cpu_kernels.load() is None
        assert "MISTRAL_SERVE_CPU_KERNELS turns them off" in caplog.text
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_VARIABLE)
        cpu_kernels.load.cache_clear()


def test_unpacking_inverts_torchs_int4_packing():
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_torch_int4(packed), q.to(torch.uint8))


def int4_layer(weight: torch.Tensor) -> Int4Linear:
    layer = Int4Linear(weight.shape[1], weight.shape[0], dtype=torch.bfloat16)
    layer.weight, layer.scales_and_zeros = quantize_int4(weight, scales_dtype=torch.bfloat16)
    return layer


def dequantized(layer: Int4Linear) -> torch.Tensor:
    """(q - 8) * scale + zero, in float64, from torch's layout."""
    q = unpack_torch_int4(layer.weight).double()
    scales, zeros = (part.t().double().repeat_interleave(layer.group_size, dim=1)
                     for part in layer.scales_and_zeros.unbind(-1))
    return (q - 8) * scales + zeros


@needs_kernels
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (64, 4096)])
@pytest.mark.parametrize("num_rows", [1, 3, 4, 7, 16])
def test_packed_int4_is_as_exact_as_torchs_kernel(out_features, in_features, num_rows):
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    unpacked, packed = int4_layer(weight), int4_layer(weight)
    exact_weight = dequantized(unpacked)
    packed.pack()
    assert packed.kernels is not None and "packed for our kernel" in repr(packed)
    x = torch.randn(num_rows, in_features, generator=generator).bfloat16()
    exact = x.double() @ exact_weight.t()
    ours, torchs = packed(x), unpacked(x)
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_rows, out_features)

    def error(out):
        return ((out.double() - exact).norm() / exact.norm()).item()
    # both multiply exactly and sum in float32, then round to bfloat16 (that rounding is ~1.6e-3 here)
    assert error(ours) <= 1.02 * error(torchs) + 1e-6
    assert error(ours) <= 1.02 * error(exact.bfloat16()) + 1e-6


@needs_kernels
def test_packed_int4_keeps_leading_dimensions():
    layer = int4_layer(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    expected = layer(x)
    layer.pack()
    out = layer(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)


@needs_kernels
def test_packed_int4_model_gives_the_logits_of_torchs_kernel(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, dtype=torch.bfloat16, quantize="int4")
    expected = prefill_logits(model, token_ids)
    pack_linears(model)
    layers = [module for module in model.modules() if isinstance(module, Int4Linear)]
    # the tiny model's k and v (32 rows) are off torch's 64-row block: they keep torch's kernel
    assert all((layer.kernels is not None) == (layer.out_features % 64 == 0) for layer in layers)
    assert model.layers[0].mlp.down_proj.kernels is not None and model.lm_head.kernels is not None
    logits = prefill_logits(model, token_ids)
    # the same products, summed in another order in float32: the bfloat16 activations round apart
    # here and there, measured 6e-3 of the logits' spread
    assert (logits - expected).abs().max() < 0.03 * expected.std()


def int8_layers(kind, weight: torch.Tensor):
    """The same int8 weights packed for our kernel and for oneDNN's int8 matmul."""
    weight8, scales = quantize_int8(weight, scales_dtype=torch.float32)
    ours, onednns = kind(weight.shape[1], weight.shape[0]), kind(weight.shape[1], weight.shape[0])
    for layer in (ours, onednns):
        layer.weight, layer.scales = weight8.clone(), scales.clone()
    onednns._fits_our_kernel = lambda: False
    ours.pack()
    onednns.pack()
    return ours, onednns


@needs_kernels
@pytest.mark.skipif(not can_pack_int8(), reason="torch without oneDNN's int8 matmul")
@pytest.mark.parametrize("kind", [Int8Linear, W8A8Linear])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 16])
def test_our_int8_kernel_sums_exactly_what_onednns_does(kind, num_rows):
    """The same int8 steps of the same inputs, summed in int32 by both: float32 rounding apart."""
    generator = torch.Generator().manual_seed(num_rows)
    ours, onednns = int8_layers(kind, torch.randn(96, 256, generator=generator))
    assert ours.kernels is not None and onednns.kernels is None
    x = torch.randn(num_rows, 256, generator=generator)
    x[:, 5] = 30  # an outlier feature, as real activations have
    expected = onednns(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # bfloat16 in and out: the same sums, rounded once at the end
    x16 = x.bfloat16()
    torch.testing.assert_close(ours(x16), onednns(x16), rtol=8e-3, atol=8e-3 * expected.abs().max().item())
