"""Function calling in Mistral's format: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`.

Two pieces: the grammar that guarantees a well-formed call (`tool_calls_schema`), and the scanner
that turns the array's text into OpenAI's streamed `delta.tool_calls` as it arrives (one pass over
each character, never a re-parse).

What the scanner has sent as calls stays calls, as OpenAI's do: text is never sent twice, once as
calls and again as content. At the end a choice's calls are whole (finish_reason "tool_calls") or
the last one is incomplete, its arguments the JSON text generated so far (finish_reason "length",
or "stop" when the model ended a call it had not closed). Output after `[TOOL_CALLS]` in which no
call ever began is not a call: it becomes content.
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
    each item names one of them and carries arguments valid against that function's parameters.

    Each function's parameters move whole under the array's `$defs` (as `call_<i>`) and every local
    reference inside them is rewritten to point there: `#/$defs/Address` in a function's parameters
    becomes `#/$defs/call_0/$defs/Address`, and `#` (a recursive reference to the parameters
    themselves) `#/$defs/call_0`. So `$defs`, `definitions` and recursion resolve as they do when
    the same schema is a response_format."""
    definitions = {f"call_{index}": _with_references_under(function.get("parameters") or EMPTY_PARAMETERS,
                                                           f"#/$defs/call_{index}")
                   for index, function in enumerate(functions)}
    calls = [{"type": "object",
              "properties": {"name": {"const": function["name"]}, "arguments": {"$ref": f"#/$defs/call_{index}"}},
              "required": ["name", "arguments"]}
             for index, function in enumerate(functions)]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
              "$defs": definitions}
    if max_num_calls is not None:
        schema["maxItems"] = max_num_calls
    return schema


EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _with_references_under(schema, base: str):
    """A copy of `schema` whose local references ("#..." in `$ref`) start at `base` instead of its root.

    Values under `const`, `enum`, `default` and `examples` are data, not schemas: copied as they are.
    Maps of names to schemas (`properties`, `$defs`…) are walked by value, so a property that happens
    to be called "const" or "$ref" is still read as a schema."""
    if isinstance(schema, list):
        return [_with_references_under(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            moved[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            moved[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            moved[key] = {name: _with_references_under(subschema, base) for name, subschema in value.items()}
        else:
            moved[key] = _with_references_under(value, base)
    return moved


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


# the output as it streams

@dataclass
class ToolCallDelta:
    """A piece of one call: the first piece of a call has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ScannedCall:
    """A call the scanner sent: its name, and its arguments' text as it was sent."""

    name: str
    arguments: list[str] = field(default_factory=list)
    is_closed: bool = False  # its object ended

    @property
    def is_whole(self) -> bool:
        if not self.is_closed:
            return False
        try:
            return isinstance(json.loads("".join(self.arguments)), dict)
        except ValueError:
            return False


@dataclass
class ToolCallScanner:
    """Reads the text of a calls array a piece at a time and says what each piece added.

    It tracks only what it must: whether it is inside a string (and after a backslash), the
    bracket depth, and at a call's top level (depth 2) which key's value comes next. The value of
    "arguments" is passed through as it arrives; a call's pieces wait for its name, so its first
    delta carries the id and the name. Calls past `max_num_calls` are read and dropped.
    """

    max_num_calls: int | None = None
    num_calls: int = 0  # calls begun, kept or not
    kept: list[ScannedCall] = field(default_factory=list)  # the calls sent, whole or not
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

    @property
    def are_kept_calls_whole(self) -> bool:
        """Whether at least one call was sent, every call sent is whole (closed, with an object as its
        arguments: what OpenAI's clients parse), and no call that would be sent was begun after them."""
        num_begun_to_send = self.num_calls if self.max_num_calls is None else min(self.num_calls, self.max_num_calls)
        return bool(self.kept) and len(self.kept) == num_begun_to_send and all(call.is_whole for call in self.kept)

    def _flush(self, deltas: list[ToolCallDelta]) -> None:
        if not self._is_kept or self._name is None:
            return
        arguments = "".join(self._pending)
        if not self._is_announced:
            self._is_announced = True
            self.kept.append(ScannedCall(self._name))
            deltas.append(ToolCallDelta(self.num_calls - 1, new_tool_call_id(), self._name, arguments))
        elif arguments:
            deltas.append(ToolCallDelta(self.num_calls - 1, arguments=arguments))
        self.kept[-1].arguments.append(arguments)
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
            if self.depth == 1 and char == "}":
                self._end_call(deltas)
        elif self.depth == 2 and char == ":":
            self._is_key_next = False
            self._is_value_arguments = self._key == "arguments"
        elif self.depth == 2 and char == ",":
            self._is_key_next = True

    def _end_call(self, deltas: list[ToolCallDelta]) -> None:
        self._flush(deltas)
        if self._is_kept and self._is_announced:
            self.kept[-1].is_closed = True

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
        """(content to add, finish reason) at the end.

        Calls whole: "tool_calls", whatever ended the generation (with parallel_tool_calls false, what
        followed the one call was never going to be sent). A call begun but not whole: it stays as
        sent, with the engine's reason. No call begun at all: the text was not calls, it is content."""
        if not self.is_in_calls:
            return "", finish_reason
        if self._scanner.are_kept_calls_whole:
            return "", "tool_calls"
        if self._scanner.num_calls:
            return "", finish_reason
        return "".join(self._calls_text), finish_reason
