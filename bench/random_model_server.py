"""`mistral-serve serve` for a random-weight model of Mistral-7B-v0.3's exact shape.

Where no 7B checkpoint is at hand (and none can be downloaded), this serves the model that
engine_models.py builds in memory (int8 by default, as `--quantize int8` loads a real one) with
Mistral's real v3 tokenizer, through the same app, engine and database as `mistral-serve serve`,
so that the serving benchmark measures what a real 7B server holds in memory. The replies are
noise; their speed and memory are not.

    python bench/random_model_server.py --port 8002 --data-dir DIR     # keys: mistral-serve keys create --data-dir DIR
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import mistral_common
import torch
import uvicorn

from engine_models import MISTRAL_7B_V03, TINY, build_random_model
from mistral_serve.api.app import create_app
from mistral_serve.cli import open_database
from mistral_serve.engine.async_engine import AsyncEngine, QueueLimits
from mistral_serve.engine.builder import engine_config, prepare_model
from mistral_serve.engine.engine import LLMEngine
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import MistralCommonTokenizer

MODEL_ID = "mistralai/Mistral-7B-Instruct-v0.3"
V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
SHAPES = {"7b": MISTRAL_7B_V03, "tiny": replace(TINY, vocab_size=MISTRAL_7B_V03.vocab_size)}  # tiny: a quick check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--data-dir", type=Path, required=True, help="where the key database lives")
    parser.add_argument("--kv-cache-memory-mb", type=int)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    settings = Settings.load({"host": args.host, "port": args.port, "data_dir": args.data_dir, "quantize": quantize,
                              "kv_cache_memory_mb": args.kv_cache_memory_mb, "max_model_len": args.max_model_len,
                              # a 7B prefill on a small CPU keeps later requests waiting for minutes: the
                              # benchmark wants them all served, not refused as overload
                              "queue_timeout_s": 3600.0})
    engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")  # as `serve` does

    def build() -> LLMEngine:
        model = build_random_model(SHAPES[args.shape], torch.bfloat16, quantize)
        return LLMEngine(prepare_model(model), MistralCommonTokenizer.from_file(V3_TOKENIZER), engine_config(settings))
    engine = engine_thread.submit(build).result()
    app = create_app(settings, {MODEL_ID: AsyncEngine(engine, QueueLimits.from_settings(settings), runs_on=engine_thread)}, open_database(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
