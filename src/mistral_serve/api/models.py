"""The model objects of `GET /models`: OpenAI's fields plus what a client needs to call the model right."""

from __future__ import annotations

from mistral_serve.api.protocol import ChatCompletionRequest, ModelCapabilities, ModelObject
from mistral_serve.catalog import Catalog, ServedModel

# what the API can do today, whatever the model can: tools and JSON mode come in later steps
API_SUPPORTS_TOOLS = False


def model_object(name: str, served: ServedModel, catalog: Catalog) -> ModelObject:
    card = served.card
    return ModelObject(
        id=name, created=served.created, owned_by=card.owned_by, display_name=card.display_name,
        description=card.description, context_length=served.context_length,
        capabilities=ModelCapabilities(tools=card.supports_tools and API_SUPPORTS_TOOLS),
        quantization=served.quantization,
        json_request_schema=request_schema(served, [n for n in catalog.names if catalog.get(n) is served]))


def request_schema(served: ServedModel, names: list[str]) -> dict:
    """The JSON Schema of the chat request body exactly as the server validates it for this model."""
    schema = ChatCompletionRequest.model_json_schema()
    properties = schema["properties"]
    properties["model"] = {"title": "Model", "type": "string", "enum": names}
    # at least one prompt token: the rest of the context is the most a reply can take
    max_new_tokens = served.context_length - 1
    for name in ("max_tokens", "max_completion_tokens"):
        for branch in properties[name]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = max_new_tokens
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
