"""Pre-packed bfloat16 linear layers compute what `F.linear` computes, and are swapped in only
where they apply."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.cpu.packed import PackedLinear, can_pack, pack_linears

needs_packing = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)),
                                   reason="this CPU's matmul library has no native bfloat16 kernels")


@needs_packing
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (16, 64), (3, 7, 64)])
def test_packed_linear_equals_f_linear(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    x = torch.randn(*shape, generator=generator).bfloat16()
    # the same bfloat16 products summed in float32: measured equal, allow bfloat16 rounding of the output
    torch.testing.assert_close(PackedLinear(weight, cpu_kernels.load())(x), F.linear(x, weight), atol=0, rtol=2 ** -7)


@needs_packing
def test_pack_linears_swaps_bfloat16_linears_only_and_keeps_tied_weights():
    model = nn.ModuleDict({"a": nn.Linear(64, 32, bias=False).bfloat16(), "b": nn.Linear(64, 32, bias=True).bfloat16(),
                           "c": nn.Linear(64, 32, bias=False), "embed": nn.Embedding(32, 64).bfloat16()})
    model["head"] = nn.Linear(64, 32, bias=False).bfloat16()
    model["head"].weight = model["embed"].weight
    assert pack_linears(model, cpu_kernels.load()) == {"a", "head"}
    assert isinstance(model["a"], PackedLinear) and type(model["b"]) is nn.Linear and type(model["c"]) is nn.Linear
    assert model["embed"].weight.shape == (32, 64)  # the embedding keeps the shared weight


@needs_packing
def test_packed_linear_refuses_another_dtype():
    with pytest.raises(ValueError, match="float32 input"):
        PackedLinear(torch.randn(8, 64).bfloat16(), cpu_kernels.load())(torch.randn(2, 64))
