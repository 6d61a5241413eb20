"""The model objects of `GET /models`: OpenAI's fields plus what a client needs to call the model right."""

from __future__ import annotations

from mistral_serve.api.protocol import ChatCompletionRequest, ModelBackend, ModelCapabilities, ModelObject, ModelPool, PoolMember
from mistral_serve.api.tools import tool_calls_token_id
from mistral_serve.catalog import Catalog, ServedModel

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def capabilities(served: ServedModel) -> ModelCapabilities:
    """What this model accepts: tools when its tokenizer has the tool-call tokens; JSON output always
    (constrained decoding works with every tokenizer)."""
    return ModelCapabilities(tools=tool_calls_token_id(served.client.tokenizer) is not None,
                             json_mode=True, json_schema=True)


def model_object(name: str, served: ServedModel, catalog: Catalog) -> ModelObject:
    card = served.card
    return ModelObject(
        id=name, created=served.created, owned_by=card.owned_by, display_name=card.display_name,
        description=card.description, context_length=served.client.max_model_len,
        capabilities=capabilities(served),
        quantization=served.quantization, backend=_backend(served), pool=_pool(served),
        json_request_schema=request_schema(served, [n for n in catalog.names if catalog.get(n) is served]))


def _backend(served: ServedModel) -> ModelBackend | None:
    backend = served.client.backend
    return None if backend is None else ModelBackend(**backend.as_dict())


def _pool(served: ServedModel) -> ModelPool | None:
    """The upstreams that serve a pooled model, and whether each is in rotation."""
    client = served.client
    if client.policy is None:
        return None
    return ModelPool(policy=client.policy, upstreams=[PoolMember(name=member.name, state=member.state)
                                                      for member in client.upstreams()])


def request_schema(served: ServedModel, names: list[str]) -> dict:
    """The JSON Schema of the chat request body exactly as the server validates it for this model."""
    schema = ChatCompletionRequest.model_json_schema()
    properties = schema["properties"]
    properties["model"] = {"title": "Model", "type": "string", "enum": names}
    # at least one prompt token: the rest of the context is the most a reply can take
    max_new_tokens = served.client.max_model_len - 1
    for name in ("max_tokens", "max_completion_tokens"):
        for branch in properties[name]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = max_new_tokens
    for name, default in served.card.sampling_defaults.items():
        properties[name]["default"] = default
    if not capabilities(served).tools:  # additionalProperties is false: a body with tools is refused
        for name in TOOL_FIELDS:
            del properties[name]
        schema["allOf"] = [rule for rule in schema["allOf"]
                           if "tool_choice" not in rule.get("if", {}).get("required", ())]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
