"""Function calling in Mistral's format: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`.

Three pieces: the grammar that guarantees a well-formed call (`tool_calls_schema`), the scanner
that turns the array's text into OpenAI's streamed `delta.tool_calls` as it arrives (one pass over
each character, never a re-parse), and the check, once at the end, that the whole output really is
a list of calls (`parse_tool_calls`); output that is not becomes plain content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json

from mistral_serve.tool_call_ids import new_tool_call_id

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"


def tool_calls_token_id(tokenizer) -> int | None:
    """The id of the `[TOOL_CALLS]` control token, or None when the model cannot call tools."""
    if not getattr(tokenizer, "supports_tools", False):
        return None
    mistral = getattr(tokenizer, "mistral", None)  # mistral-common's tokenizer (Mistral checkpoints)
    if mistral is None:
        return None
    tokenizer = mistral.instruct_tokenizer.tokenizer
    get_token = getattr(tokenizer, "get_special_token", None) or tokenizer.get_control_token  # older releases
    try:
        return int(get_token(TOOL_CALLS_TOKEN))
    except (AttributeError, KeyError, ValueError):
        return None


# the grammar of a forced call

def tool_calls_schema(functions: list[dict], *, max_num_calls: int | None) -> dict:
    """The JSON Schema of a non-empty array of calls to `functions` (OpenAI function definitions):
    each item names one of them and carries arguments valid against that function's parameters."""
    calls = [{"type": "object",
              "properties": {"name": {"const": function["name"]},
                             "arguments": function.get("parameters") or {"type": "object", "properties": {}}},
              "required": ["name", "arguments"]}
             for function in functions]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if max_num_calls is not None:
        schema["maxItems"] = max_num_calls
    return schema


# the whole output, once

def parse_tool_calls(text: str) -> list[dict] | None:
    """`[{"name": ..., "arguments": {...}}, ...]` → [{"name", "arguments": JSON text}], or None when the
    text is not a non-empty list of calls (the caller then returns it as content)."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls:
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return None
        arguments = call.get("arguments")
        if not isinstance(arguments, dict):
            return None
        parsed.append({"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)})
    return parsed


# the output as it streams

@dataclass
class ToolCallDelta:
    """A piece of one call: the first piece of a call has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCallScanner:
    """Reads the text of a calls array a piece at a time and says what each piece added.

    It tracks only what it must: whether it is inside a string (and after a backslash), the
    bracket depth, and at a call's top level (depth 2) which key's value comes next. The value of
    "arguments" is passed through as it arrives; a call's pieces wait for its name, so its first
    delta carries the id and the name. Calls past `max_num_calls` are read and dropped.
    """

    max_num_calls: int | None = None
    num_calls: int = 0
    depth: int = 0
    is_in_string: bool = False
    is_escaped: bool = False
    _is_key_next: bool = False
    _key: str | None = None
    _string: list[str] | None = None  # a key or name being read, quotes included
    _is_value_arguments: bool = False  # the next value is the arguments'
    _is_in_arguments: bool = False
    _is_scalar_arguments: bool = False
    _name: str | None = None
    _is_announced: bool = False
    _pending: list[str] = field(default_factory=list)  # arguments text not yet sent

    def feed(self, text: str) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        for char in text:
            self._step(char, deltas)
        self._flush(deltas)
        return deltas

    # the current call's pieces

    @property
    def _is_kept(self) -> bool:
        return self.num_calls > 0 and (self.max_num_calls is None or self.num_calls <= self.max_num_calls)

    def _flush(self, deltas: list[ToolCallDelta]) -> None:
        if not self._is_kept or self._name is None:
            return
        if not self._is_announced:
            self._is_announced = True
            deltas.append(ToolCallDelta(self.num_calls - 1, new_tool_call_id(), self._name, "".join(self._pending)))
        elif self._pending:
            deltas.append(ToolCallDelta(self.num_calls - 1, arguments="".join(self._pending)))
        self._pending.clear()

    def _start_call(self, deltas: list[ToolCallDelta]) -> None:
        self._flush(deltas)
        self.num_calls += 1
        self._name, self._is_announced, self._key, self._is_key_next = None, False, None, True
        self._pending.clear()

    # one character

    def _step(self, char: str, deltas: list[ToolCallDelta]) -> None:
        if self._is_in_arguments and self._step_in_arguments(char):
            return
        if self.is_in_string:
            self._step_in_string(char)
            if self._string is not None:
                self._string.append(char)
                if not self.is_in_string:
                    self._end_string("".join(self._string))
            return
        if self._is_value_arguments and not char.isspace():
            self._is_value_arguments = False
            self._is_in_arguments, self._is_scalar_arguments = True, char not in '{["'
            if self._step_in_arguments(char):
                return
        if char == '"':
            self.is_in_string = True
            if self.depth == 2:
                self._string = [char]
        elif char in "{[":
            self.depth += 1
            if self.depth == 2 and char == "{":
                self._start_call(deltas)
        elif char in "}]":
            self.depth -= 1
        elif self.depth == 2 and char == ":":
            self._is_key_next = False
            self._is_value_arguments = self._key == "arguments"
        elif self.depth == 2 and char == ",":
            self._is_key_next = True

    def _step_in_string(self, char: str) -> None:
        if self.is_escaped:
            self.is_escaped = False
        elif char == "\\":
            self.is_escaped = True
        elif char == '"':
            self.is_in_string = False

    def _step_in_arguments(self, char: str) -> bool:
        """Pass one character of the arguments value on; False when it ended before this character."""
        if self.is_in_string:
            self._step_in_string(char)
        elif self._is_scalar_arguments and char in ",}" and self.depth == 2:
            self._is_in_arguments = False  # a number or literal ends at what follows it
            return False
        elif char == '"':
            self.is_in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
        if self._is_kept:
            self._pending.append(char)
        if self.depth == 2 and not self.is_in_string and (char in "}]" or char == '"'):
            self._is_in_arguments = False
        return True

    def _end_string(self, raw: str) -> None:
        self._string = None
        try:
            value = json.loads(raw)
        except ValueError:
            return
        if self._is_key_next:
            self._key = value
        elif self._key == "name" and self._name is None:
            self._name = value


@dataclass(frozen=True)
class ToolCalling:
    """How a request's output is read for calls: from the start (a forced call, whose prompt ends
    with `[TOOL_CALLS]`) or from the `[TOOL_CALLS]` token on, if the model emits it."""

    token_id: int
    is_forced: bool
    max_num_calls: int | None  # 1 without parallel calls

    def reader(self) -> ChoiceReader:
        return ChoiceReader(self)


@dataclass
class ChoiceReader:
    """One choice's output: content until `[TOOL_CALLS]`, then calls, streamed as they come."""

    calling: ToolCalling
    is_in_calls: bool = False
    _calls_text: list[str] = field(default_factory=list)
    _scanner: ToolCallScanner | None = None

    def __post_init__(self) -> None:
        if self.calling.is_forced:
            self._begin_calls()

    def _begin_calls(self) -> None:
        self.is_in_calls = True
        self._scanner = ToolCallScanner(max_num_calls=self.calling.max_num_calls)

    def on_delta(self, text: str, token_ids: tuple[int, ...]) -> tuple[str, list[ToolCallDelta]]:
        """(content, call pieces) of one engine delta. The text of the delta that holds the
        `[TOOL_CALLS]` token (itself no text) is read as the calls'."""
        if not self.is_in_calls and self.calling.token_id in token_ids:
            self._begin_calls()
        if not self.is_in_calls:
            return text, []
        self._calls_text.append(text)
        return "", self._scanner.feed(text)

    def finish(self, finish_reason: str) -> tuple[str, str]:
        """(content to add, finish reason) at the end: calls that do not parse become content."""
        if not self.is_in_calls:
            return "", finish_reason
        text = "".join(self._calls_text)
        if finish_reason == "stop" and parse_tool_calls(text) is not None and self._scanner.num_calls:
            return "", "tool_calls"
        return text, finish_reason
