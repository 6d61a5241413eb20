"""Constrained decoding's cost to the unconstrained streams sharing its batches.

On the demo model (engine.builder.load_engine on find_demo_gguf()), LLMEngine.step() in a loop, no
HTTP. Two scenarios, each after a short warm-up:

  alone: N unconstrained greedy streams (ignore_eos, a fixed output length);
  mixed: the same N streams plus N json_schema-constrained streams, all added at once, so every
         step batches both kinds.

For the unconstrained streams it reports decode tokens/s (their tokens only, from the step after
their first token to their last) and ms per engine step, in both scenarios, and the ratio.

    python bench/guided_bench.py [--streams 8] [--output-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from mistral_serve.engine.builder import load_engine
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.engine.params import GuidedDecoding, SamplingParams
from mistral_serve.model.checkpoints.loader import find_demo_gguf

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4}},
    "required": ["name", "age", "tags"]}
PROMPT = "Describe a person in a few words."


def run(engine, prompt: list[int], free: int, guided: int, tokens: int, tag: str) -> dict:
    """Run `free` unconstrained and `guided` constrained streams to the end; the free ones' numbers."""
    plain = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, temperature=0.0, guided=GuidedDecoding.json_schema(SCHEMA))
    free_ids = {f"{tag}-free-{i}" for i in range(free)}
    for i in range(free):
        engine.add_request(f"{tag}-free-{i}", prompt, plain)
    for i in range(guided):
        engine.add_request(f"{tag}-json-{i}", prompt, constrained)
    counts = dict.fromkeys(free_ids, 0)
    decode_steps, decode_time, decode_tokens = 0, 0.0, 0
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        deltas = engine.step()
        elapsed = time.perf_counter() - started
        free_deltas = [d for d in deltas if d.request_id in free_ids and d.token_ids]
        # a decode step: every free stream already had its first token before it
        if free_deltas and all(counts[d.request_id] >= 1 for d in free_deltas):
            decode_steps += 1
            decode_time += elapsed
            decode_tokens += sum(len(d.token_ids) for d in free_deltas)
        for d in free_deltas:
            counts[d.request_id] += len(d.token_ids)
    assert all(count == tokens for count in counts.values()), counts
    return {"tokens_per_s": decode_tokens / decode_time, "ms_per_step": 1000 * decode_time / decode_steps,
            "steps": decode_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="unconstrained streams (and constrained ones added)")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(str(find_demo_gguf()), config=EngineConfig(max_num_seqs=2 * args.streams, seed=0))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    run(engine, prompt, 2, 2, 4, "warmup")  # compiles the grammar, warms the kernels
    alone = run(engine, prompt, args.streams, 0, args.output_tokens, "alone")
    mixed = run(engine, prompt, args.streams, args.streams, args.output_tokens, "mixed")
    # control: as many streams as "mixed", none constrained (separates batch size from grammar cost)
    double = run(engine, prompt, 2 * args.streams, 0, args.output_tokens, "double")
    print(f"demo model {find_demo_gguf().name}, {torch.get_num_threads()} threads, prompt {len(prompt)} tokens, "
          f"{args.output_tokens} output tokens per stream, greedy\n")
    print("| scenario | unconstrained streams | constrained streams | unconstrained decode tok/s | ms/step |")
    print("|---|---|---|---|---|")
    rows = (("alone", alone, args.streams, 0), ("mixed", mixed, args.streams, args.streams),
            ("control: all unconstrained", double, 2 * args.streams, 0))
    for name, result, free, guided in rows:
        print(f"| {name} | {free} | {guided} | {result['tokens_per_s']:.1f} | {result['ms_per_step']:.1f} |")
    print(f"\nmixed / alone: tok/s x{mixed['tokens_per_s'] / alone['tokens_per_s']:.2f}, "
          f"ms/step x{mixed['ms_per_step'] / alone['ms_per_step']:.2f}")
    print(f"mixed / control (same batch size): ms/step x{mixed['ms_per_step'] / double['ms_per_step']:.2f}")


if __name__ == "__main__":
    main()
