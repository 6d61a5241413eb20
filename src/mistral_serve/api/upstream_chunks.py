"""UpstreamRelay: an upstream's chunk events → the gateway's chunks, and what they tell of the tokens.

Each event is rebuilt field by field into our chunk model (the gateway's id, created and the model
name the client used), so that whatever an upstream adds of its own never reaches the client and
what it lacks is filled in as OpenAI's replies have it. Token counts come from the usage the gateway
asks for in every chunk; an upstream that sends usage only at the end, or never, is counted with our
tokenizer over the text it delivered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from mistral_serve.api.protocol import (
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FinishReason,
    TokenLogprob, TopLogprob,
)

if TYPE_CHECKING:
    from mistral_serve.api.chat import Generation, GenerationProgress
    from mistral_serve.tokenizer import ChatTokenizer

FINISH_REASONS = frozenset(get_args(FinishReason))
CUT = "cut"  # the usage row's finish_reason of a reply an upstream broke off


class UpstreamRelay:
    def __init__(self, generation: Generation, progress: GenerationProgress, tokenizer: ChatTokenizer):
        self.generation = generation
        self.progress = progress
        self.tokenizer = tokenizer
        self._texts: dict[int, list[str]] = {}  # per choice: the text delivered, for counting without usage
        self._num_tokens_by_usage: int | None = None  # the upstream's running count, when it sends one
        self._is_counted_by_usage = False

    def on_event(self, event: dict) -> Iterator[ChatCompletionChunk]:
        """The chunks of one upstream event (none for its closing usage event)."""
        usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
        choices = [_choice(raw, self.generation.params.logprobs) for raw in event.get("choices") or ()]
        choices = [choice for choice in choices if choice is not None]
        self._count(choices, usage)
        if choices:
            yield self.generation.chunk(choices)

    def on_end(self) -> None:
        """The stream reached its end: a reply whose usage never came is counted here."""
        if not self._is_counted_by_usage:
            self._count_texts()

    def on_cut(self) -> None:
        """The upstream broke off: the row holds what was delivered, its finish_reason says it was cut."""
        if not self._is_counted_by_usage:
            self._count_texts()
        self.progress.finish_reason = CUT

    def _count(self, choices: list[ChunkChoice], usage: dict | None) -> None:
        progress, generation = self.progress, self.generation
        total = _whole(usage.get("completion_tokens")) if usage else None
        if usage and (num_prompt := _whole(usage.get("prompt_tokens"))) is not None:
            progress.num_prompt_tokens = num_prompt
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and (num_cached := _whole(details.get("cached_tokens"))) is not None:
                progress.num_cached_tokens = num_cached
        for choice in choices:
            self._texts.setdefault(choice.index, []).append(_text_of(choice.delta))
        if total is not None:
            self._is_counted_by_usage = True
            num_new = total - (self._num_tokens_by_usage or 0)
            self._num_tokens_by_usage = total
            index = choices[0].index if choices else 0
            progress.on_tokens(generation, index, max(num_new, 0),
                               progress.num_output_tokens.get(index, 0) + max(num_new, 0),
                               choices[0].finish_reason if choices else None)
            for choice in choices[1:]:
                progress.on_tokens(generation, choice.index, 0, progress.num_output_tokens.get(choice.index, 0),
                                   choice.finish_reason)
            return
        for choice in choices:  # no running count: one token per delta with text, counted for real at the end
            num_new = 1 if _text_of(choice.delta) else 0
            progress.on_tokens(generation, choice.index, num_new,
                               progress.num_output_tokens.get(choice.index, 0) + num_new, choice.finish_reason)

    def _count_texts(self) -> None:
        for index, pieces in self._texts.items():
            text = "".join(pieces)
            self.progress.num_output_tokens[index] = len(self.tokenizer.encode(text)) if text else 0


def _choice(raw: dict, wants_logprobs: bool) -> ChunkChoice | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("index"), int):
        return None
    delta = raw.get("delta") if isinstance(raw.get("delta"), dict) else {}
    calls = [_tool_call(call) for call in delta.get("tool_calls") or () if isinstance(call, dict)]
    finish_reason = raw.get("finish_reason")
    return ChunkChoice(
        index=raw["index"],
        delta=DeltaMessage(role="assistant" if delta.get("role") == "assistant" else None,
                           content=delta.get("content") if isinstance(delta.get("content"), str) else None,
                           tool_calls=calls or None),
        logprobs=_logprobs(raw.get("logprobs")) if wants_logprobs else None,
        finish_reason=finish_reason if finish_reason in FINISH_REASONS else ("stop" if finish_reason else None))


def _tool_call(raw: dict) -> DeltaToolCall:
    function = raw.get("function") if isinstance(raw.get("function"), dict) else {}
    call_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    return DeltaToolCall(index=raw.get("index") if isinstance(raw.get("index"), int) else 0, id=call_id,
                         type="function" if call_id else None,
                         function=DeltaFunctionCall(name=_str_or_none(function.get("name")),
                                                    arguments=_str_or_none(function.get("arguments"))))


def _logprobs(raw) -> ChoiceLogprobs | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=str(entry.get("token", "")), logprob=float(entry.get("logprob", 0.0)),
                     bytes=entry.get("bytes"),
                     top_logprobs=[TopLogprob(token=str(top.get("token", "")), logprob=float(top.get("logprob", 0.0)),
                                              bytes=top.get("bytes"))
                                   for top in entry.get("top_logprobs") or () if isinstance(top, dict)])
        for entry in raw["content"] if isinstance(entry, dict)])


def _text_of(delta: DeltaMessage) -> str:
    """What a delta delivered, to count it by: its text and its calls' names and arguments."""
    calls = "".join((call.function.name or "") + (call.function.arguments or "") for call in delta.tool_calls or ())
    return (delta.content or "") + calls


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def _whole(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
