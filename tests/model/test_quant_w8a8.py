"""int8 weights × int8 activations (CPU): the layer against a reference that quantizes its inputs the
same way in float32, and whole models loaded with quantize="w8a8"."""

import pytest
import torch
import torch.nn.functional as F

from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.cpu.packed import pack_linears
from mistral_serve.model.fused import fuse_projections
from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.quant import W8A8Linear, quantize_int8
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.model.helpers import prefill_logits


def w8a8_layer(weight: torch.Tensor) -> W8A8Linear:
    layer = W8A8Linear(weight.shape[1], weight.shape[0])
    layer.weight, layer.scales = quantize_int8(weight, scales_dtype=torch.float32)
    return layer


def reference(x: torch.Tensor, layer_weight: torch.Tensor, layer_scales: torch.Tensor) -> torch.Tensor:
    """Each input row rounded to 255 levels of its own absmax, times the dequantized weight, in float32."""
    x32 = x.float()
    row_scales = x32.abs().amax(-1, keepdim=True) / 127
    return F.linear((x32 / row_scales).round() * row_scales, layer_weight.float() * layer_scales[:, None])


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_w8a8_linear_equals_the_float_reference_of_the_same_rounding(rows, dtype, tolerance):
    generator = torch.Generator().manual_seed(rows)
    layer = w8a8_layer(torch.randn(96, 128, generator=generator))
    weight, scales = layer.weight.clone(), layer.scales.clone()
    layer.pack(cpu_kernels.load())  # a W8A8 layer runs packed only
    x = torch.randn(2, rows, 128, generator=generator).to(dtype)
    x[0, 0, 5] = 40.0  # an outlier: its row gets a coarse scale, the other rows keep theirs
    out = layer(x)
    assert out.shape == (2, rows, 96) and out.dtype == dtype and layer.packed_weight is not None
    expected = reference(x, weight, scales)
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()
    # a row's result does not depend on the other rows of its batch
    torch.testing.assert_close(layer(x[1:, -1:]), out[1:, -1:], atol=0, rtol=0)


def test_a_w8a8_model_stays_near_the_float_model_and_fuses_without_change(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, quantize="w8a8")
    assert isinstance(model.layers[0].mlp.down_proj, W8A8Linear)
    pack_linears(model, cpu_kernels.load())  # a W8A8 layer runs packed only
    float_logits = prefill_logits(load_model(path), token_ids)
    w8a8_logits = prefill_logits(model, token_ids)
    # int8 weights and inputs against float32, through these random 2-layer models: measured ~4%
    assert (w8a8_logits - float_logits).norm() < 0.1 * float_logits.norm()
    fused = load_model(path, quantize="w8a8")
    fuse_projections(fused)  # as preparing the model does, before it packs the weights
    pack_linears(fused, cpu_kernels.load())
    assert isinstance(fused.layers[0].self_attn.qkv_proj, W8A8Linear)
    torch.testing.assert_close(prefill_logits(fused, token_ids), w8a8_logits, atol=1e-4, rtol=1e-4)


def test_w8a8_is_refused_off_the_cpu(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    with pytest.raises(ValueError, match="CPU only"):
        load_model(path, quantize="w8a8", device="meta")
