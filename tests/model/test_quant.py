"""Weight-only int8: the quantizer, the layer, and whole models loaded with quantize="int8"."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.cpu.packed import pack_linears
from mistral_serve.model.quant import Int8Linear, W8A8Linear, can_pack_int8, quantize_int8, swap_linears_for_int8
from tests.checkpoints import (hf_state_dict, tiny_llama_config, tiny_mistral_config, write_gguf_checkpoint,
                               write_hf_checkpoint)
from tests.model.helpers import prefill_logits

# The int8 model against the float model with the same dequantized weights: only float rounding
# differs (measured ~7e-6 on logits of spread ~1.7).
DEQUANTIZED_LOGITS_TOLERANCE = 1e-4
# The int8 model against the float model: quantization noise itself.  Per-row int8 keeps each weight
# within half a step (row absmax / 254); through these random 2-layer models that moves the logits by
# ~3% of their norm (measured 3.4% and 3.1%).
INT8_LOGITS_RELATIVE_TOLERANCE = 0.06
# Packed (CPU), the inputs go in as two int8 passes too, each feature within 1/64516 of its row's
# largest: the logits against the dequantized float model then differ by up to ~1.6e-3 (measured).
PACKED_LOGITS_TOLERANCE = 5e-3


def test_quantize_int8_is_symmetric_per_output_row():
    torch.manual_seed(0)
    weight = torch.randn(8, 64) * torch.linspace(0.01, 10, 8)[:, None]  # rows of very different size
    weight[3] = 0
    quantized, scales = quantize_int8(weight)
    assert quantized.dtype == torch.int8 and scales.shape == (8,) and scales.dtype == torch.float32
    assert quantized.abs().max() <= 127
    nonzero = [row for row in range(8) if row != 3]
    assert torch.allclose(scales[nonzero], weight[nonzero].abs().amax(dim=1) / 127)
    assert torch.equal(quantized[3], torch.zeros(64, dtype=torch.int8))
    error = (quantized.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()


def test_quantize_int8_stores_scales_in_the_asked_dtype():
    weight = torch.randn(4, 32)
    quantized, scales = quantize_int8(weight, scales_dtype=torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    # rounded against the stored scales: still within half a step of the weight
    assert ((quantized.float() * scales.float()[:, None] - weight).abs() <= scales.float()[:, None] / 2 + 1e-6).all()


def test_quantize_int8_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_int8(torch.randn(4))


def _int8_linear(weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
    layer = Int8Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    layer.weight, layer.scales = quantize_int8(weight, scales_dtype=dtype)
    return layer


# (input shape, whether the fused CPU kernel takes it), for both dtypes
PATHS = [((2, 1, 64), True), ((2, 20, 64), False), ((2, 1, 48), False)]


@pytest.mark.parametrize("x_shape, uses_kernel", PATHS, ids=["kernel", "many-rows", "odd-width"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int8_linear_equals_float_linear_on_dequantized_weight(x_shape, uses_kernel, dtype, tolerance):
    torch.manual_seed(0)
    layer = _int8_linear(torch.randn(24, x_shape[-1]), dtype)
    x = torch.randn(x_shape).to(dtype)  # leading batch dimensions
    assert layer._can_use_int8_kernel(x.reshape(-1, x_shape[-1])) == uses_kernel  # both paths stay covered
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    expected = F.linear(x.float(), dequantized)  # (*x_shape[:-1], 24)
    out = layer(x)
    assert out.shape == (*x_shape[:-1], 24) and out.dtype == dtype
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()


needs_int8_packing = pytest.mark.skipif(not can_pack_int8(), reason="torch built without oneDNN")


@needs_int8_packing
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_int8_linear_keeps_its_inputs_to_about_16_bits(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 128, generator=generator)
    x = torch.randn(2, rows, 128, generator=generator)
    x[0, 0, 5] = 40.0  # an outlier feature: the other features of its row sit far below its scale
    errors = {}
    for kind in (Int8Linear, W8A8Linear):
        layer = _int8_linear(weight, torch.float32) if kind is Int8Linear else kind(128, 96)
        layer.weight, layer.scales = quantize_int8(weight)
        expected = F.linear(x, layer.weight.float() * layer.scales[:, None])  # exact inputs, same int8 weight
        layer.pack(cpu_kernels.load())
        assert layer.packed_weight is not None and layer.weight.numel() == 0  # no second copy of the weight
        out = layer(x)
        assert out.shape == (2, rows, 96) and out.dtype == torch.float32
        errors[kind] = ((out - expected).abs().max() / expected.abs().max()).item()
        # a row's result does not depend on the other rows of its batch
        torch.testing.assert_close(layer(x[1:, -1:]), out[1:, -1:], atol=0, rtol=0)
    # two input passes: each feature within 1/64516 of its row's largest, measured ~1e-4 of the
    # outputs' range; one pass (W8A8) ~3e-2
    assert errors[Int8Linear] < 3e-4 and errors[W8A8Linear] > 30 * errors[Int8Linear]


def test_swap_linears_for_int8_leaves_excluded_and_other_modules():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32, bias=False), nn.Linear(32, 10, bias=False))
    swapped = swap_linears_for_int8(model, dtype=torch.bfloat16, exclude={"2"})
    assert swapped == {"1"}
    assert isinstance(model[1], Int8Linear) and model[1].weight.device.type == "meta"
    assert model[1].scales.dtype == torch.bfloat16
    assert type(model[2]) is nn.Linear


def test_swap_linears_for_int8_refuses_biases():
    with pytest.raises(ValueError, match="bias-free"):
        swap_linears_for_int8(nn.Sequential(nn.Linear(4, 4)), dtype=torch.float32)


# whole models


def dequantized_copy(model):
    """The float model with every linear that int8 would quantize replaced by its dequantized weight."""
    tied = model.config.tie_word_embeddings
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not (name == "lm_head" and tied):
            weight, scales = quantize_int8(module.weight)
            module.weight = nn.Parameter(weight.float() * scales[:, None], requires_grad=False)
    return model


@pytest.mark.parametrize("make_config", [tiny_mistral_config, tiny_llama_config], ids=["mistral", "llama-tied"])
def test_int8_model_logits(tmp_path, make_config):
    path, _ = write_hf_checkpoint(tmp_path, make_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    int8_logits = prefill_logits(load_model(path, quantize="int8"), token_ids)
    float_logits = prefill_logits(load_model(path), token_ids)
    dequantized_logits = prefill_logits(dequantized_copy(load_model(path)), token_ids)
    assert float_logits.std() > 1  # logits that mean something
    assert (int8_logits - dequantized_logits).abs().max() < DEQUANTIZED_LOGITS_TOLERANCE
    assert (int8_logits - float_logits).norm() < INT8_LOGITS_RELATIVE_TOLERANCE * float_logits.norm()
    if can_pack_int8():  # as the engine runs it on a CPU: int8 inputs in two passes
        packed = load_model(path, quantize="int8")
        pack_linears(packed, cpu_kernels.load())
        assert isinstance(packed.layers[0].mlp.down_proj.packed_weight, torch.Tensor)
        packed_logits = prefill_logits(packed, token_ids)
        assert (packed_logits - dequantized_logits).abs().max() < PACKED_LOGITS_TOLERANCE


def _assert_quantized_like(model, hf_model):
    """Every decoder linear (and an untied lm_head) holds quantize_int8 of the reference weight."""
    expected = hf_state_dict(hf_model)
    state = model.state_dict()
    tied = hf_model.config.tie_word_embeddings
    linears = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Int8Linear))]
    assert len(linears) == 7 * model.config.num_layers + 1
    for name in linears:
        module = model.get_submodule(name)
        if name == "lm_head" and tied:
            assert type(module) is nn.Linear and module.weight is model.embed_tokens.weight
            continue
        assert isinstance(module, Int8Linear), name
        weight, scales = quantize_int8(expected[f"{name}.weight"])
        assert torch.equal(state[f"{name}.weight"], weight) and torch.equal(state[f"{name}.scales"], scales), name
    assert torch.equal(state["embed_tokens.weight"], expected["embed_tokens.weight"])


@pytest.mark.parametrize("make_config", [tiny_mistral_config, tiny_llama_config], ids=["mistral", "llama-tied"])
def test_load_hf_checkpoint_as_int8(tmp_path, make_config):
    path, hf_model = write_hf_checkpoint(tmp_path, make_config())
    _assert_quantized_like(load_model(path, quantize="int8"), hf_model)


def test_load_gguf_checkpoint_as_int8(tmp_path):
    path, hf_model = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    _assert_quantized_like(load_model(write_gguf_checkpoint(tmp_path, hf_model), quantize="int8"), hf_model)


def test_int8_bfloat16_model_keeps_bfloat16_scales_and_runs(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    model = load_model(path, dtype=torch.bfloat16, quantize="int8")
    assert model.layers[0].mlp.down_proj.scales.dtype == torch.bfloat16
    logits = prefill_logits(model, torch.arange(10))
    assert logits.shape == (10, 512) and torch.isfinite(logits).all()
