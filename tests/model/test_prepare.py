"""Preparing a loaded model for inference: what runs on our kernels, what stays on torch's, and
preparing twice changes nothing."""

import pytest
import torch

from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.cpu.layers import CpuRMSNorm
from mistral_serve.model.prepare import prepare_for_inference
from tests.checkpoints import write_hf_checkpoint
from tests.model.helpers import head_dim_32_config, needs_kernels, prefill_logits

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_our_kernels_the_model_runs_on_torchs(tmp_path, dtype):
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config())
    prepared = prepare_for_inference(load_model(path, dtype=dtype), CPU, None)
    assert prepared.attention_kernels is None and prepared.fused_decode is None
    assert not isinstance(prepared.model.norm, CpuRMSNorm)
    assert prepared.dtype == dtype and prepared.kernel_path == "linear layers on torch's kernels"


@needs_kernels
def test_a_bfloat16_model_gets_the_one_call_decode_step_on_our_kernels(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config())
    prepared = prepare_for_inference(load_model(path, dtype=torch.bfloat16), CPU, cpu_kernels.load())
    assert prepared.fused_decode is not None and prepared.attention_kernels is not None
    assert isinstance(prepared.model.norm, CpuRMSNorm)
    assert prepared.kernel_path.endswith("decode attention on ours, decode steps in one call")


@needs_kernels
@pytest.mark.parametrize("wrong", ["float32", "fewer heads", "one layer short"])
def test_the_one_call_decode_step_refuses_caches_its_kernel_would_misread(tmp_path, wrong):
    """The kernel reads the caches through raw pointers on every step: a cache of the wrong dtype or
    shape is refused before it is ever read."""
    config = head_dim_32_config()
    path, _ = write_hf_checkpoint(tmp_path, config)
    prepared = prepare_for_inference(load_model(path, dtype=torch.bfloat16), CPU, cpu_kernels.load())
    shape = (4, 16, prepared.config.num_kv_heads, prepared.config.head_dim)
    if wrong == "fewer heads":
        shape = (4, 16, prepared.config.num_kv_heads - 1, prepared.config.head_dim)
    dtype = torch.float32 if wrong == "float32" else torch.bfloat16
    num_layers = prepared.config.num_layers - (wrong == "one layer short")
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(num_layers)]
    with pytest.raises(ValueError, match="KV caches"):
        prepared.fused_decode(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), caches, None,
                              torch.zeros(1, dtype=torch.int64))


@needs_kernels
def test_preparing_a_prepared_model_changes_nothing(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, dtype=torch.bfloat16, quantize="int4")
    expected = prefill_logits(prepare_for_inference(model, CPU, cpu_kernels.load()).model, token_ids)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    again = prepare_for_inference(model, CPU, cpu_kernels.load())
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert again.fused_decode is not None
    torch.testing.assert_close(prefill_logits(again.model, token_ids), expected, atol=0, rtol=0)


def test_a_model_is_prepared_on_the_device_it_was_loaded_on(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config())
    with pytest.raises(ValueError, match="not on cuda"):
        prepare_for_inference(load_model(path), torch.device("cuda"), None)
