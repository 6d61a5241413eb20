"""Our CPU kernels (cpu/kernels.c): built here, checked against exact references and torch's kernels."""

from contextlib import contextmanager
import logging

import pytest
import torch
import torch.nn.functional as F

from mistral_serve.engine.builder import prepare_model
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.params import SamplingParams
from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.attention import AttentionMetadata, paged_attention
from mistral_serve.model.cpu.layouts import int8_layout, unpack_torch_int4
from mistral_serve.model.cpu.library import AMX_VARIABLE, DISABLE_VARIABLE
from mistral_serve.model.cpu.layers import CpuMLP, CpuRMSNorm, use_cpu_layers
from mistral_serve.model.fused import fuse_projections
from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.cpu.packed import PackedLinear, pack_linears
from mistral_serve.model.quant import Int4Linear, Int8Linear, W8A8Linear, can_pack_int8, quantize_int4, quantize_int8
from mistral_serve.tokenizer import load_tokenizer
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.engine.helpers import ByteTokenizer
from tests.model.helpers import head_dim_32_config, needs_kernels, prefill_logits



@contextmanager
def kernels_switched_off(monkeypatch, variable: str = DISABLE_VARIABLE):
    """As a user turns them (or their use of the tile units) off: the variable set to 0 before
    anything loads them."""
    monkeypatch.setenv(variable, "0")
    cpu_kernels.forget_loaded()
    try:
        yield
    finally:
        monkeypatch.delenv(variable)
        cpu_kernels.forget_loaded()


def test_switched_off_by_the_environment(monkeypatch, caplog):
    with kernels_switched_off(monkeypatch), caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.load() is None
    assert "MISTRAL_SERVE_CPU_KERNELS turns them off" in caplog.text


def test_tile_units_switched_off_by_the_environment(monkeypatch):
    with kernels_switched_off(monkeypatch, AMX_VARIABLE):
        kernels = cpu_kernels.load()
        assert kernels is None or not kernels.amx


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
    packed.pack(cpu_kernels.load())
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
    layer.pack(cpu_kernels.load())
    out = layer(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)


@needs_kernels
def test_packed_int4_model_gives_the_logits_of_torchs_kernel(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, dtype=torch.bfloat16, quantize="int4")
    expected = prefill_logits(model, token_ids)
    pack_linears(model, cpu_kernels.load())
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
    ours.pack(cpu_kernels.load())
    onednns.pack(None)  # without our kernels: oneDNN's
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


def reference_decode_attention(q, k_cache, v_cache, tables, context_lens, window, scale):
    """float64, one sequence and head at a time, from the block tables."""
    num_decodes, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for d in range(num_decodes):
        length = int(context_lens[d])
        positions = torch.arange(max(0, length - window) if window else 0, length)
        slots = tables[d][positions // block_size] * block_size + positions % block_size
        keys = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()  # (keys, kv_heads, head_dim)
        values = v_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()
        for h in range(num_heads):
            kv_head = h // (num_heads // num_kv_heads)
            weights = torch.softmax(keys[:, kv_head] @ q[d, h].double() * scale, dim=0)
            out[d, h] = weights @ values[:, kv_head]
    return out


@needs_kernels
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decode_attention_reads_the_cache_in_place(num_heads, num_kv_heads, head_dim, window):
    generator = torch.Generator().manual_seed(head_dim)
    block_size, num_blocks = 16, 64
    context_lens = torch.tensor([1, 5, 16, 17, 100, 300])
    width = -(-int(context_lens.max()) // block_size)
    # each sequence's blocks scattered over the cache, tables padded with 0
    tables = torch.zeros(len(context_lens), width, dtype=torch.int64)
    for d, length in enumerate(context_lens.tolist()):
        used = -(-length // block_size)
        tables[d, :used] = torch.randperm(num_blocks, generator=generator)[:used]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=generator) * 2).bfloat16()
    v_cache = torch.randn(shape, generator=generator).bfloat16()
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=generator).bfloat16()
    scale = head_dim ** -0.5
    out = cpu_kernels.load().paged_decode_attention(q, k_cache, v_cache, tables, context_lens, window, scale)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64), num_decodes=len(context_lens),
                             decode_block_tables=tables, decode_context_lens=context_lens, prefills=(),
                             sliding_window=window)
    sdpa = paged_attention(q, None, None, k_cache, v_cache, meta, scale)  # the gathered path, on SDPA
    exact = reference_decode_attention(q, k_cache, v_cache, tables, context_lens, window, scale)

    def error(result):
        return ((result.double() - exact).norm() / exact.norm()).item()
    # float32 scores and softmax, output rounded to bfloat16 (~2e-3 here): as close as SDPA's
    assert error(out) <= 1.1 * error(sdpa) + 1e-5 and error(out) < 4e-3


@needs_kernels
def test_cpu_layers_give_the_models_logits(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config())
    token_ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    model = load_model(path, dtype=torch.bfloat16)
    fuse_projections(model)
    expected = prefill_logits(model, token_ids)
    assert use_cpu_layers(model, cpu_kernels.load())
    assert isinstance(model.layers[1].mlp, CpuMLP) and isinstance(model.norm, CpuRMSNorm)
    logits = prefill_logits(model, token_ids)
    assert expected.std() > 1
    # the torch ops' bfloat16 roundings, mirrored; sums of squares and exponentials in another
    # order or polynomial: a bfloat16 step apart here and there
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)


@needs_kernels
def test_cpu_layers_refuse_heads_the_kernels_do_not_take(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())  # heads of 16
    model = load_model(path, dtype=torch.bfloat16)
    fuse_projections(model)
    assert not use_cpu_layers(model, cpu_kernels.load())
    assert not isinstance(model.norm, CpuRMSNorm)


def greedy_steps(engine: LLMEngine) -> list[list[tuple[str, tuple[int, ...], list[float]]]]:
    """Three prompts decoded greedily to 12 tokens: per step, each request's new tokens and their
    logprobs."""
    for index, length in enumerate((5, 23, 40)):
        engine.add_request(str(index), list(range(3, 3 + length)),
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True))
    steps = []
    while engine.has_unfinished_requests():
        steps.append([(delta.request_id, delta.token_ids, [entry.logprob for entry in delta.logprobs or ()])
                      for delta in engine.step()])
    return steps


def tiny_engine(path, quantize: str | None = None) -> LLMEngine:
    return LLMEngine(prepare_model(load_model(path, dtype=torch.bfloat16, quantize=quantize)), ByteTokenizer(),
                     EngineConfig(kv_cache_memory=8 << 20, block_size=16))


@needs_kernels
def test_engine_decodes_alike_with_and_without_the_kernels(tmp_path, monkeypatch):
    """Greedy decoding through the whole engine (paged decode attention, fused layers) against the
    torch path, on the same bfloat16 weights: the logprobs of each step's token agree."""
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config(vocab_size=ByteTokenizer.vocab_size))
    with_kernels = greedy_steps(tiny_engine(path))
    with kernels_switched_off(monkeypatch):
        without = greedy_steps(tiny_engine(path))
    assert [[entry[:2] for entry in step] for step in with_kernels] == [[entry[:2] for entry in step]
                                                                        for step in without]
    # the logits leave a bfloat16 layer, where one step of a logit between 4 and 8 is 0.03: measured
    # up to 0.052 apart (two steps), once in 36
    logprobs = [logprob for step in with_kernels for *_, entry in step for logprob in entry]
    expected = [logprob for step in without for *_, entry in step for logprob in entry]
    assert len(logprobs) == 36
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected), atol=0.1, rtol=0)


@needs_kernels
@pytest.mark.parametrize("quantize", [None, "int4"], ids=["bfloat16", "int4"])
def test_a_fused_decode_step_is_the_module_path_exactly(tmp_path, quantize):
    """The whole decoder stack in one call runs the modules' kernels in their order: the same bits."""
    path, _ = write_hf_checkpoint(tmp_path, head_dim_32_config(vocab_size=ByteTokenizer.vocab_size))
    fused, unfused = tiny_engine(path, quantize), tiny_engine(path, quantize)
    assert fused.runner.fused_decode is not None
    unfused.runner.fused_decode = None
    assert greedy_steps(fused) == greedy_steps(unfused)


@needs_kernels
@pytest.mark.parametrize("num_rows", [1, 3, 4, 7, 16])
def test_our_bfloat16_kernel_is_as_exact_as_the_matmul_library(num_rows):
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 256, generator=generator).bfloat16()
    layer = PackedLinear(weight, cpu_kernels.load())
    assert layer.kernels is not None
    x = torch.randn(num_rows, 256, generator=generator).bfloat16()
    exact = x.double() @ weight.double().t()
    out = layer(x)

    def error(result):
        return ((result.double() - exact).norm() / exact.norm()).item()
    # exact products summed in float32, rounded once to bfloat16, as F.linear does
    assert error(out) <= 1.02 * error(F.linear(x, weight)) + 1e-6


@needs_kernels
@pytest.mark.demo
def test_demo_model_on_the_kernels_is_as_close_to_float32_as_torchs_path(demo_path):
    """The int4 demo model, bfloat16 activations, on our kernels and on torch's ops, against the
    same int4 weights dequantized into a float32 model: both paths carry bfloat16's noise (measured
    0.063 and 0.061 mean |Δ logprob| of the text's own next tokens), ours no more than torch's."""
    tokenizer = load_tokenizer(demo_path)
    token_ids = torch.tensor(tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
                             + tokenizer.encode("The capital of France is Paris. It is a large city with museums"))
    torchs = load_model(demo_path, dtype=torch.bfloat16, quantize="int4")
    fuse_projections(torchs)
    ours = load_model(demo_path, dtype=torch.bfloat16, quantize="int4")
    fuse_projections(ours)
    pack_linears(ours, cpu_kernels.load())
    assert use_cpu_layers(ours, cpu_kernels.load()) and ours.lm_head.kernels is not None
    reference = load_model(demo_path, dtype=torch.float32)
    for name, layer in torchs.named_modules():
        if isinstance(layer, Int4Linear):
            parent, _, child = name.rpartition(".")
            plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
            plain.weight = torch.nn.Parameter(dequantized(layer).float(), requires_grad=False)
            setattr(reference.get_submodule(parent), child, plain)
    fuse_projections(reference)

    def next_token_logprobs(model):
        logprobs = torch.log_softmax(prefill_logits(model, token_ids).float(), dim=-1)[:-1]
        return logprobs.gather(1, token_ids[1:, None]).squeeze(1)
    expected = next_token_logprobs(reference)
    ours_error = (next_token_logprobs(ours) - expected).abs().mean().item()
    torchs_error = (next_token_logprobs(torchs) - expected).abs().mean().item()
    assert ours_error < 0.1 and ours_error <= 1.25 * torchs_error


needs_tile_units = pytest.mark.skipif(cpu_kernels.load() is None or not cpu_kernels.load().amx,
                                      reason="this CPU has no tile units (AMX), or the OS does not lend them")


def on_both_paths(run):
    """run() on the tile units, then on the vector loops: (tiles' result, vector loops' result)."""
    kernels = cpu_kernels.load()
    on_tiles = run()
    kernels.enable_amx(False)
    try:
        return on_tiles, run()
    finally:
        kernels.enable_amx(True)


@needs_tile_units
@pytest.mark.parametrize("num_rows", [2, 3, 8, 13, 16, 17, 40, 64])
@pytest.mark.parametrize("input_passes", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int8_on_the_tile_units_sums_exactly_what_the_vector_loops_do(num_rows, input_passes, dtype):
    """Both sum the same int8 steps in int32 and scale them alike: the same numbers, bit for bit,
    whatever the row count (padded to 16 on the tiles)."""
    generator = torch.Generator().manual_seed(num_rows)
    weight8, scales = quantize_int8(torch.randn(96, 320, generator=generator), scales_dtype=torch.float32)
    tiled, sums = int8_layout(weight8)
    x = (torch.randn(num_rows, 320, generator=generator) * 3).to(dtype)
    on_tiles, on_vectors = on_both_paths(
        lambda: cpu_kernels.load().int8_linear(x, tiled, scales, sums, input_passes))
    assert torch.equal(on_tiles, on_vectors)


@needs_tile_units
@pytest.mark.parametrize("num_rows", [2, 3, 8, 13, 16, 17, 40, 64])
def test_bfloat16_on_the_tile_units_is_as_exact_as_the_matmul_library(num_rows):
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 320, generator=generator).bfloat16()
    layer = PackedLinear(weight, cpu_kernels.load())
    x = torch.randn(num_rows, 320, generator=generator).bfloat16()
    exact = x.double() @ weight.double().t()
    on_tiles, on_vectors = on_both_paths(lambda: layer(x))

    def error(result):
        return ((result.double() - exact).norm() / exact.norm()).item()
    # exact products summed in float32, rounded once to bfloat16: as F.linear, as the vector loops
    assert error(on_tiles) <= 1.02 * error(F.linear(x, weight)) + 1e-6
    assert error(on_tiles) <= 1.02 * error(on_vectors) + 1e-6
