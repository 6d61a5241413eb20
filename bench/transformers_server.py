"""A baseline for the serving benchmark: transformers' `generate` behind a minimal OpenAI chat endpoint.

This is what serving with no engine of one's own looks like: the checkpoint (here a GGUF file,
which transformers dequantizes to float32) loaded with `from_pretrained`, one `generate` call per
request, and requests served strictly one at a time (a lock), since `generate` batches nothing
across requests. It honours what the benchmark sends: messages, max_tokens, temperature (0:
greedy), stream with stream_options.include_usage, logit_bias, and ignore_eos.

    python bench/transformers_server.py --gguf FILE --model NAME --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
import queue
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
import uvicorn


class TokenQueue(BaseStreamer):
    """Each generated token id, as `generate` makes it, into a queue: one chunk per token, as the
    other servers stream, so that inter-token latencies compare (TextIteratorStreamer holds text
    back to whole words)."""

    def __init__(self):
        self.queue: queue.Queue[int | None] = queue.Queue()
        self._is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._is_prompt:  # generate hands the prompt over first
            self._is_prompt = False
            return
        for token_id in value.view(-1).tolist():
            self.queue.put(token_id)

    def end(self) -> None:
        self.queue.put(None)


class LogitBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


def create_app(model, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI()
    one_at_a_time = asyncio.Lock()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "transformers"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        events = _generate_events(model, tokenizer, prompt, body, model_name, one_at_a_time)
        if body.get("stream"):
            return StreamingResponse(events, media_type="text/event-stream")
        chunks = [json.loads(event[len("data: "):]) async for event in events if not event.startswith("data: [DONE]")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        usage = next(c["usage"] for c in chunks if c.get("usage"))
        return JSONResponse({"id": chunks[0]["id"], "object": "chat.completion", "model": model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": chunks[-2]["choices"][0]["finish_reason"]}],
                             "usage": usage})

    return app


def _generate_kwargs(body: dict, tokenizer, streamer: TokenQueue) -> dict:
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 256
    temperature = body.get("temperature", 1.0)
    kwargs = {"max_new_tokens": max_tokens, "streamer": streamer, "pad_token_id": tokenizer.eos_token_id,
              "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=body.get("top_p", 1.0), top_k=0)
    if body.get("ignore_eos"):
        kwargs["min_new_tokens"] = max_tokens
    if body.get("logit_bias"):
        kwargs["logits_processor"] = LogitsProcessorList([LogitBias(
            {int(k): float(v) for k, v in body["logit_bias"].items()})])
    return kwargs


async def _generate_events(model, tokenizer, prompt: list[int], body: dict, model_name: str, lock: asyncio.Lock):
    streamer = TokenQueue()
    kwargs = _generate_kwargs(body, tokenizer, streamer)
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        data = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices, **({"usage": usage} if usage else {})}
        return f"data: {json.dumps(data)}\n\n"

    async with lock:
        input_ids = torch.tensor([prompt])
        thread = threading.Thread(target=model.generate, kwargs={"input_ids": input_ids, **kwargs}, daemon=True)
        thread.start()
        yield chunk({"role": "assistant", "content": ""})
        tokens, text = [], ""
        while (token_id := await asyncio.to_thread(streamer.queue.get)) is not None:
            tokens.append(token_id)
            decoded = tokenizer.decode(tokens, skip_special_tokens=True)
            if not decoded.endswith("\ufffd"):  # a character split across tokens waits for its end
                yield chunk({"content": decoded[len(text):]})
                text = decoded
        await asyncio.to_thread(thread.join)
    finish = "stop" if tokens and tokens[-1] == tokenizer.eos_token_id else "length"
    yield chunk({}, finish)
    if (body.get("stream_options") or {}).get("include_usage") or not body.get("stream"):
        yield chunk({}, usage={"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                               "total_tokens": len(prompt) + len(tokens)})
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF checkpoint")
    parser.add_argument("--model", required=True, help="the model id to answer to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name,
                                                 dtype=torch.float32).eval()
    uvicorn.run(create_app(model, tokenizer, args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
