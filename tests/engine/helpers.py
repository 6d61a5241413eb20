"""Fakes for engine tests and the tests built on the engine: a byte-level tokenizer, a model that
fails on demand, and JSON schemas of a chosen size."""

from mistral_serve.tokenizer import ChatTokenizer


class ByteTokenizer(ChatTokenizer):
    """Token id = byte value; id 0 is the end of sequence."""

    vocab_size = 256
    bos_token_id = None
    eos_token_ids = frozenset({0})
    supports_tools = False

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(m["content"] for m in messages))

    def encode(self, text):
        return list(text.encode())

    def decode(self, token_ids, skip_special_tokens=True):
        return bytes(t for t in token_ids if t or not skip_special_tokens).decode(errors="replace")

    def token_bytes(self, token_id):
        return bytes([token_id])

    def is_special(self, token_id):
        return token_id == 0


class FaultyModel:
    """The model, except that a run fails whenever its batch holds the poison token, or once when
    told to (a fault that does not recur)."""

    POISON = 0  # the end-of-sequence byte: the tests' prompts never hold it

    def __init__(self, model, poison: int = POISON):
        self.model, self.poison, self.fail_once = model, poison, False

    def __call__(self, token_ids, *args):
        if self.fail_once or (token_ids == self.poison).any():
            self.fail_once = False
            raise RuntimeError("the model run failed")
        return self.model(token_ids, *args)


def object_with(num_properties: int) -> dict:
    """A JSON schema of an object with `num_properties` integer properties."""
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(num_properties)}}


def nested(depth: int) -> dict:
    """A schema whose JSON nests `depth` levels: each level an object in the one above."""
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"items": schema}
    return schema
