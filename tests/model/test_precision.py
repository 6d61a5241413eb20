"""The dtype and quantization choices, and "auto"."""

import pytest
import torch

from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.precision import cpu_has_native_bfloat16, resolve_dtype
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint


def test_auto_is_bfloat16_on_cuda_and_on_cpus_with_native_bfloat16():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    native = cpu_has_native_bfloat16()
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("options, message", [({"dtype": torch.int8}, "dtype must be one of"),
                                              ({"quantize": "int2"}, "quantize must be one of int8, int4, w8a8"),
                                              ({"quantize": "int4", "device": "meta"}, "CPU only")])
def test_the_loader_refuses_other_choices(tmp_path, options, message):
    path, _ = write_hf_checkpoint(tmp_path, tiny_mistral_config())
    with pytest.raises(ValueError, match=message):
        load_model(path, **options)
