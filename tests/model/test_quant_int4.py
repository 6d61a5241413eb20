"""Weight-only int4 (CPU): the quantizer, the layer, and whole models loaded with quantize="int4"."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.quant import Int4Linear, int4_group_size, quantize_int4
from tests.checkpoints import tiny_llama_config, tiny_mistral_config, write_hf_checkpoint
from tests.model.helpers import prefill_logits

# The int4 model against the float model with the same weights dequantized by a reference
# quantizer: only float rounding differs. (Against the float model itself int4 noise is large on
# these random models, whose weights are all of one spread: ~45% of the logits' norm.)
DEQUANTIZED_LOGITS_TOLERANCE = 1e-3


def dequantize_int4(weight: torch.Tensor) -> torch.Tensor:
    """What the kernel computes with: (q - 8) * scale + zero, from an unpacked reference quantizer."""
    out_features, in_features = weight.shape
    group_size = int4_group_size(in_features)
    groups = weight.float().reshape(out_features, -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-6) / 15
    zeros = low + 8 * scales
    q = ((groups - zeros) / scales + 8).round().clamp(0, 15)
    return ((q - 8) * scales + zeros).reshape(out_features, in_features)


def int4_linear(weight: torch.Tensor) -> Int4Linear:
    layer = Int4Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    layer.weight, layer.scales_and_zeros = quantize_int4(weight)
    return layer


@pytest.mark.parametrize("in_features, group_size", [(64, 64), (96, 32), (576, 64), (4096, 128)])
def test_group_size_is_the_largest_the_width_allows(in_features, group_size):
    assert int4_group_size(in_features) == group_size


@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_int4_linear_equals_float_linear_on_dequantized_weight(num_rows):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=generator)
    x = torch.randn(num_rows, 96, generator=generator)
    expected = F.linear(x, dequantize_int4(weight))
    torch.testing.assert_close(int4_linear(weight)(x), expected, atol=1e-4, rtol=1e-4)


def test_int4_linear_keeps_leading_dimensions_and_bfloat16():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    out = int4_linear(weight.bfloat16())(x.bfloat16())
    assert out.shape == (2, 3, 32) and out.dtype == torch.bfloat16
    expected = F.linear(x, dequantize_int4(weight))
    # bfloat16 input, scales, offsets and output, against float32 throughout: measured 3%
    assert (out.float() - expected).norm() < 0.06 * expected.norm()


def test_int4_rejects_widths_without_a_group():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(8, 48))


@pytest.mark.parametrize("make_config", [tiny_mistral_config, tiny_llama_config], ids=["mistral", "llama-tied"])
def test_int4_model_logits(tmp_path, make_config):
    path, _ = write_hf_checkpoint(tmp_path, make_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, quantize="int4")
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    int4_logits = prefill_logits(model, token_ids)
    # a tied output layer too gets its own int4 copy; the embedding look-ups stay in float
    assert isinstance(model.lm_head, Int4Linear) and model.embed_tokens.weight.is_floating_point()
    reference = load_model(path)
    for module in reference.modules():
        if isinstance(module, nn.Linear):  # rebinding a tied lm_head leaves the embedding as it was
            module.weight = nn.Parameter(dequantize_int4(module.weight), requires_grad=False)
    dequantized_logits = prefill_logits(reference, token_ids)
    assert dequantized_logits.std() > 1  # logits that mean something
    assert (int4_logits - dequantized_logits).abs().max() < DEQUANTIZED_LOGITS_TOLERANCE


def test_int4_is_refused_off_the_cpu(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    with pytest.raises(ValueError, match="CPU only"):
        load_model(path, quantize="int4", device="meta")
