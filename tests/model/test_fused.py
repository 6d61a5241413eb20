"""Fused projections: stacked q/k/v and gate/up layers give the outputs of the separate layers."""

import pytest
import torch
from torch import nn

from mistral_serve.model.fused import fuse_projections, stack_linears
from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from tests.checkpoints import tiny_llama_config, tiny_mistral_config, write_hf_checkpoint
from tests.model.helpers import prefill_logits

OUT_FEATURES = (128, 64, 64)  # q, k, v of a grouped-query layer: multiples of the int4 row block


def float_layer(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def int8_layer(weight):
    layer = Int8Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    layer.weight, layer.scales = quantize_int8(weight)
    return layer


def int4_layer(weight):
    layer = Int4Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    layer.weight, layer.scales_and_zeros = quantize_int4(weight)
    return layer


@pytest.mark.parametrize("make_layer, dtype", [(float_layer, torch.float32), (int8_layer, torch.bfloat16),
                                               (int4_layer, torch.bfloat16)], ids=["float", "int8", "int4"])
def test_a_stacked_layer_gives_the_separate_layers_outputs_side_by_side(make_layer, dtype):
    generator = torch.Generator().manual_seed(0)
    layers = [make_layer(torch.randn(out, 256, generator=generator).to(dtype)) for out in OUT_FEATURES]
    stacked = stack_linears(layers)
    assert type(stacked) is type(layers[0]) and stacked.out_features == sum(OUT_FEATURES)
    with torch.inference_mode():
        for rows in (1, 5):
            x = torch.randn(rows, 256, generator=generator).to(dtype)
            torch.testing.assert_close(stacked(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_layers_of_different_kinds_or_int4_rows_off_the_block_are_not_stacked():
    weight = torch.randn(64, 256)
    assert stack_linears([float_layer(weight), int8_layer(weight)]) is None
    assert stack_linears([int4_layer(torch.randn(32, 256)), int4_layer(weight)]) is None


# the tiny models' k and v have 32 rows: int4 keeps them apart (off its 64-row block) and fuses gate/up
@pytest.mark.parametrize("make_config, quantize, fused_per_layer", [
    (tiny_mistral_config, None, 2), (tiny_llama_config, "int8", 2), (tiny_mistral_config, "int4", 1)])
def test_a_fused_model_gives_the_logits_of_the_unfused_one(tmp_path, make_config, quantize, fused_per_layer):
    path, _ = write_hf_checkpoint(tmp_path, make_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    dtype = torch.float32 if quantize is None else torch.bfloat16
    model = load_model(path, dtype=dtype, quantize=quantize)
    expected = prefill_logits(model, token_ids)
    assert fuse_projections(model) == fused_per_layer * model.config.num_layers
    assert model.layers[0].mlp.gate_up_proj is not None and not hasattr(model.layers[0].mlp, "gate_proj")
    assert fuse_projections(model) == 0  # already fused: left as it is
    # the same rows of the same weights: float32 to rounding, bfloat16 to its own rounding of the outputs
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prefill_logits(model, token_ids), expected, atol=tolerance, rtol=tolerance)
