"""The chat API's data models, in OpenAI's field order; our extensions are fenced and marked.

Requests are validated strictly (JSON types as the schema says, no unknown fields), so the JSON
Schema these models produce is exactly what the server accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from mistral_serve.api.tools import tool_calls_schema
from mistral_serve.engine.params import (
    MAX_N, MAX_STOP_STRINGS, MAX_TOOLS, MAX_TOP_LOGPROBS, GuidedDecoding, SamplingParams,
)

MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit too
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
_SMALLEST_TOP_P = 1e-9
CONTROL_FREE = r"^[^\x00-\x1f\x7f-\x9f]*$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# messages

class TextPart(_Request):
    type: Literal["text"]
    text: str


Content = Union[str, list[TextPart]]


class SystemMessage(_Request):
    content: Content
    role: Literal["system", "developer"]  # "developer": OpenAI's newer name for the system message
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system"


class UserMessage(_Request):
    content: Content
    role: Literal["user"]
    name: str | None = None


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text
    # the openai package's parse() adds the parsed arguments to the message it returns; sent back, ignored
    parsed_arguments: Any = Field(default=None, exclude=True)


class ToolCallParam(_Request):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Request):
    content: Content | None = None
    refusal: str | None = None
    role: Literal["assistant"]
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    parsed: Any = Field(default=None, exclude=True)  # as parsed_arguments: parse()'s, sent back, ignored


class ToolMessage(_Request):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


def _role_tag(message) -> str | None:
    """The message class a role picks: "developer" is a system message; None when there is no role."""
    role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
    if not isinstance(role, str):
        return None
    return "system" if role == "developer" else role


Message = Annotated[Union[Annotated[SystemMessage, Tag("system")], Annotated[UserMessage, Tag("user")],
                          Annotated[AssistantMessage, Tag("assistant")], Annotated[ToolMessage, Tag("tool")]],
                    Discriminator(_role_tag, custom_error_type="invalid_role", custom_error_message=(
                        "a message's role must be one of system (or developer), user, assistant or tool"))]


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class JsonSchemaFormat(_Request):
    name: FunctionName
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # always strict here: the output validates against the schema


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[Union[ResponseFormatText, ResponseFormatJsonObject, ResponseFormatJsonSchema],
                           Field(discriminator="type")]


# tools

class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema; None: no parameters
    strict: bool | None = None  # always strict when a call is forced; see ChatCompletionRequest.tool_choice


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required", "any"], NamedToolChoice]  # "any": Mistral's "required"


class StreamOptions(_Request):
    include_usage: bool | None = None
    # --- extension (vLLM's): with include_usage, every chunk carries the usage so far ---
    continuous_usage_stats: bool | None = None


ModelId = Annotated[str, Field(pattern=CONTROL_FREE)]  # printed in errors, stored with usage: no control characters
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,12}$")]  # logit_bias keys: token ids, as strings


def _schema_as_validated(schema: dict) -> None:
    """Say in the JSON Schema what validation checks beyond the fields' types: logit_bias takes no
    other keys than token ids, and the rules of `_consistent`."""
    for branch in schema["properties"]["logit_bias"]["anyOf"]:
        if "patternProperties" in branch:
            branch["additionalProperties"] = False
    def needs(field: str, when: dict, then: dict) -> dict:
        return {"if": {"properties": {field: when}, "required": [field]}, "then": then}
    schema["allOf"] = [
        needs("top_logprobs", {"type": "integer", "minimum": 1},
              {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}),
        needs("stream_options", {"type": "object"},
              {"properties": {"stream": {"const": True}}, "required": ["stream"]}),
        needs("tool_choice", {"not": {"type": "null"}},
              {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}),
        {"not": {"required": ["max_tokens", "max_completion_tokens"],
                 "properties": {"max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"}}}},
    ]


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra=_schema_as_validated)

    messages: list[Message] = Field(min_length=1)
    model: ModelId
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[TokenIdKey, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, ge=0.0, le=1.0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # "auto" when there are tools
    parallel_tool_calls: bool | None = None  # true unless false
    user: str | None = None
    # OpenAI's fields that cannot change the answer: accepted and ignored (README "Compatibility")
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    store: Literal[False] | None = None  # true asks the server to keep the completion: it keeps none
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)  # prefix caching here is automatic
    safety_identifier: str | None = Field(default=None, max_length=64)
    modalities: list[Literal["text"]] | None = None  # text is all this server writes
    # --- extensions (not OpenAI's; accepted by other hosted providers) ---
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    # vLLM's: a fixed output length for benchmarks and tests
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    # --- end of extensions ---

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        if tools is not None and len(tools) > MAX_TOOLS:
            raise ValueError(f"{len(tools)} tools were given; at most {MAX_TOOLS} are accepted (max_tools)")
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("each tool needs its own function name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: ToolChoice | None, info) -> ToolChoice | None:
        if choice is None or "tools" not in info.data:  # tools failed validation: that is the error
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if not names:
            raise ValueError("tool_choice is only allowed when tools are given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                             f"({', '.join(names)})")
        return choice

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_tokens and max_completion_tokens are the same limit; send one of them")
        return self

    def to_sampling_params(self, temperature: float = 1.0, top_p: float = 1.0) -> SamplingParams:
        """The engine's parameters for this request (raises ValueError for values the engine refuses).
        `temperature` and `top_p` are the model's defaults, for a request that leaves them out or null."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if "temperature" in self.model_fields_set and self.temperature is not None:
            temperature = self.temperature
        if "top_p" in self.model_fields_set and self.top_p is not None:
            top_p = self.top_p
        return SamplingParams(
            n=self.n if self.n is not None else 1,
            max_tokens=self.max_new_tokens,
            temperature=temperature,
            top_p=max(top_p, _SMALLEST_TOP_P),  # top_p 0: the top token
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
            logit_bias={int(token_id): bias for token_id, bias in (self.logit_bias or {}).items()},
            seed=self.seed,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            stop=stop,
            guided=self.guided_decoding,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice | None:
        """None without tools; "required" for Mistral's "any"; "auto" by default."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return "required" if choice == "any" else choice

    @property
    def is_tool_call_forced(self) -> bool:
        return self.effective_tool_choice not in (None, "auto", "none")

    @property
    def max_num_tool_calls(self) -> int | None:
        return 1 if self.parallel_tool_calls is False or isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def guided_decoding(self) -> GuidedDecoding | None:
        """What the output must match: a forced tool call's array, or the response format."""
        choice = self.effective_tool_choice
        if self.is_tool_call_forced:
            functions = [tool.function.model_dump(exclude_none=True) for tool in self.tools
                         if not isinstance(choice, NamedToolChoice) or tool.function.name == choice.function.name]
            return GuidedDecoding.json_schema(tool_calls_schema(functions, max_num_calls=self.max_num_tool_calls))
        response_format = self.response_format
        if isinstance(response_format, ResponseFormatJsonObject) or (
                isinstance(response_format, ResponseFormatJsonSchema) and response_format.json_schema.schema_ is None):
            return GuidedDecoding("json_object")
        if isinstance(response_format, ResponseFormatJsonSchema):
            return GuidedDecoding.json_schema(response_format.json_schema.schema_)
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def is_usage_streamed(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def is_usage_streamed_with_every_chunk(self) -> bool:
        return self.is_usage_streamed and bool(self.stream_options.continuous_usage_stats)


# responses

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class PromptTokensDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # left out when there are none, as OpenAI leaves it out (and refuses an empty array sent back to it)
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class Choice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# errors

class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


# models

class ModelCapabilities(_Response):
    chat_completions: bool = True
    streaming: bool = True
    logprobs: bool = True
    tools: bool
    json_mode: bool = False
    json_schema: bool = False


class ModelBackend(_Response):
    """Where and on which kernels the model runs (an extension)."""

    device: str
    dtype: str
    kernels: str
    kernel_path: str


class PoolMember(_Response):
    name: str
    state: Literal["healthy", "ejected"]  # ejected: out of rotation until a health check passes


class ModelPool(_Response):
    """The upstreams a pooled model is served by (an extension)."""

    policy: str  # how a request's upstream is picked: "prefix_affinity" or "least_outstanding"
    upstreams: list[PoolMember]


class ModelObject(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # --- extensions (not OpenAI's) ---
    display_name: str
    description: str
    context_length: int
    capabilities: ModelCapabilities
    quantization: str | None
    backend: ModelBackend | None  # null when a pool of upstreams serves the model
    pool: ModelPool | None = None  # the upstreams, when a pool serves the model
    json_request_schema: dict
    # --- end of extensions ---


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelObject]
