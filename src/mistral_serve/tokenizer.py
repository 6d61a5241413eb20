"""Chat messages → prompt token ids, and token ids → text.

Mistral checkpoints go through mistral-common, Mistral's own reference for prompt formats,
tokenization and message validation (widened to the conversations OpenAI accepts, in
mistral_conversation.py); any other checkpoint through its own chat template, with transformers.
Both take OpenAI-shaped messages and return the ids of a prompt that ends with an open assistant
turn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path
import json
import re
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import InstructTokenizer, SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV3
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
import pydantic

from mistral_serve.mistral_conversation import conversation_validator, mistral_messages

__all__ = [
    "ChatTemplateError", "ChatTokenizer", "HFTokenizer",
    "MistralCommonTokenizer", "TokenizerError", "load_tokenizer",
]


class TokenizerError(ValueError):
    """A checkpoint has no usable tokenizer."""


class ChatTemplateError(ValueError):
    """The messages are not a conversation the model's prompt format accepts (an HTTP 400)."""


class ChatTokenizer(ABC):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    supports_tools: bool

    @abstractmethod
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """OpenAI-shaped messages (and tools) → prompt ids, ending with an open assistant turn."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text → ids, without BOS."""

    @abstractmethod
    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a special token: its name)."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool: ...

    def token_text(self, token_id: int) -> str:
        """One token as text, for logprobs: "▁Paris" is " Paris"; a lone byte of a character is U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def grammar_vocab(self) -> list[bytes]:
        """Each token's bytes as the text it adds to the output, by id, for a grammar engine.

        Tokens that never stand for output text (special and control tokens, unknown) are b"",
        which a grammar engine never allows, so constrained output is exactly its decoded text.
        """
        return [b"" if self._is_never_text(i) else self.token_bytes(i) for i in range(self.vocab_size)]

    def _is_never_text(self, token_id: int) -> bool:
        return self.is_special(token_id)


# messages

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_ROLES_NEEDING_CONTENT = frozenset({"system", "developer", "user", "tool"})


def _check_messages(messages: list[dict]) -> None:
    """Reject, with the message's index, what neither prompt format can take."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ChatTemplateError(f"messages[{index}]: expected a message with a role in {sorted(_ROLES)}")
        content = message.get("content")
        if content is None and message["role"] in _ROLES_NEEDING_CONTENT:
            raise ChatTemplateError(f"messages[{index}]: a {message['role']} message needs content")
        if isinstance(content, list) and not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content):
            raise ChatTemplateError(f"messages[{index}]: only text content parts are supported")


def _reason(error: Exception) -> str:
    if isinstance(error, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))
    return str(error)


# Mistral (mistral-common)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_V3_VOCAB_SIZE = 32768
# serving mode needs a model name; it does not change the tokens
_REQUEST_MODEL = "served-model"


class MistralCommonTokenizer(ChatTokenizer):
    """A Mistral checkpoint's own tokenizer file, with mistral-common's prompt format and validation.

    `mistral` is mistral-common's tokenizer, for what needs it whole (a grammar engine, tool calls),
    with a validator that takes system messages anywhere (mistral_conversation.py).
    """

    def __init__(self, mistral: MistralTokenizer):
        self.mistral = mistral
        self._tokenizer: SentencePieceTokenizer | Tekkenizer = mistral.instruct_tokenizer.tokenizer
        self.version: TokenizerVersion = mistral.version
        self.vocab_size = self._tokenizer.n_words
        self.bos_token_id = self._tokenizer.bos_id
        self.eos_token_ids = frozenset({self._tokenizer.eos_id})
        self.supports_tools = self.version >= TokenizerVersion.v2

    @classmethod
    def from_file(cls, path: str | Path) -> MistralCommonTokenizer:
        path = Path(path)
        try:
            if path.name == "tokenizer.model":
                instruct = _from_unversioned_sentencepiece(path)
            else:  # its validator is replaced below
                instruct = MistralTokenizer.from_file(path).instruct_tokenizer
            version = instruct.tokenizer.version
            return cls(MistralTokenizer(
                instruct, validator=conversation_validator(version),
                request_normalizer=get_normalizer(version, instruct.tokenizer.model_settings_builder)))
        except (MistralCommonException, AssertionError, OSError, RuntimeError, ValueError) as e:
            raise TokenizerError(f"{path}: not a usable Mistral tokenizer ({e})") from e

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        _check_messages(messages)
        if tools and not self.supports_tools:
            raise ChatTemplateError("this model does not support tools")
        try:
            request = ChatCompletionRequest.from_openai(
                mistral_messages(messages, self.version), tools=tools or None, model=_REQUEST_MODEL)
            return self.mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:
            raise ChatTemplateError(_reason(e)) from e

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, bos=False, eos=False)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        token_ids = list(token_ids)
        if skip_special_tokens:
            return self._tokenizer.decode(token_ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        if isinstance(self._tokenizer, Tekkenizer):
            return self._tokenizer.decode(token_ids, special_token_policy=SpecialTokenPolicy.KEEP)
        # mistral-common keeps special tokens by returning raw pieces ("▁Hello"), so decode the
        # text between them; SentencePiece drops the leading "▁" of each run as if it began the text
        parts: list[str] = []
        for is_special, run in groupby(token_ids, self.is_special):
            run = list(run)
            if is_special:
                parts.extend(self._tokenizer.id_to_piece(t) for t in run)
                continue
            text = self._tokenizer.decode(run)
            if parts and self._tokenizer.id_to_piece(run[0]).startswith("▁"):
                text = " " + text
            parts.append(text)
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes:
        if isinstance(self._tokenizer, Tekkenizer):
            return self._tokenizer.id_to_byte_piece(token_id, special_token_policy=SpecialTokenPolicy.KEEP)
        piece = self._tokenizer.id_to_piece(token_id)
        if self.is_special(token_id):
            return piece.encode()
        if token_id == self._tokenizer.unk_id:
            return self._tokenizer.decode([token_id]).encode()
        if byte := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(byte[1], 16)])
        return piece.replace("▁", " ").encode()

    def is_special(self, token_id: int) -> bool:
        return self._tokenizer.is_special(int(token_id))

    def _is_never_text(self, token_id: int) -> bool:
        return self.is_special(token_id) or token_id == self._tokenizer.unk_id


def _from_unversioned_sentencepiece(path: Path) -> InstructTokenizer:
    """A bare `tokenizer.model`: mistral-common reads v1 from that name, whatever the vocabulary.

    A 32768-token vocabulary is v3's (Mistral-7B-Instruct-v0.3 ships one under this name too), so
    it gets v3's instruct tokenizer, as `MistralTokenizer.from_file` would for a `tokenizer.model.v3`.
    """
    tokenizer = SentencePieceTokenizer(path)
    if tokenizer.n_words != _V3_VOCAB_SIZE:
        return MistralTokenizer.from_file(path).instruct_tokenizer
    return InstructTokenizerV3(SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion.v3))


# any other checkpoint (transformers)

_PROBE_REPLY = "mistral-serve probe reply"


class HFTokenizer(ChatTokenizer):
    """A Hugging Face tokenizer (directory or GGUF metadata) and the checkpoint's chat template.

    `hf` is the transformers tokenizer, for what needs it whole (a grammar engine).
    """

    def __init__(self, hf: Any, *, source: Path, extra_eos_token_ids: Iterable[int] = ()):
        self.hf = hf
        try:
            template = hf.get_chat_template(tools=[])  # the one used when tools are given
        except ValueError as e:
            raise TokenizerError(f"{source}: the tokenizer has no usable chat template ({e})") from e
        self.vocab_size = len(hf)
        self.bos_token_id = hf.bos_token_id
        self.supports_tools = "tools" in template
        added = hf.added_tokens_decoder  # id → AddedToken
        self._added_ids = frozenset(added)
        self._special_ids = frozenset(hf.all_special_ids) | {i for i, t in added.items() if t.special}
        eos = {hf.eos_token_id, *extra_eos_token_ids, *self._end_of_turn_ids()}
        self.eos_token_ids = frozenset(t for t in eos if t is not None)
        decoders = _decoder_types(hf)
        self._is_byte_level = "ByteLevel" in decoders
        self._has_byte_fallback = "ByteFallback" in decoders

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        path = Path(path)
        hf = _auto_tokenizer(path, str(path))
        return cls(hf, source=path, extra_eos_token_ids=_generation_config_eos_ids(path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        path = Path(path)
        return cls(_auto_tokenizer(path, str(path.parent), gguf_file=path.name), source=path)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from jinja2 import TemplateError

        _check_messages(messages)
        if tools and not self.supports_tools:
            raise ChatTemplateError("this model does not support tools")
        try:
            # sanitize: control tokens written in message text stay text, only the template's count
            ids = self.hf.apply_chat_template(
                [_hf_message(m) for m in messages], tools=tools or None, add_generation_prompt=True,
                tokenize=True, return_dict=False, sanitize_control_tokens=True)
        except (TemplateError, ValueError) as e:
            raise ChatTemplateError(str(e)) from e
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # no clean-up of spaces: it makes a text's decoding differ from the sum of its parts'
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        token = self.hf.convert_ids_to_tokens(int(token_id))
        if token_id in self._added_ids:
            return token.encode()
        if self._is_byte_level:
            return b"".join(bytes([_BYTE_LEVEL_DECODER[c]]) if c in _BYTE_LEVEL_DECODER else c.encode()
                            for c in token)
        if self._has_byte_fallback and (byte := _BYTE_PIECE.fullmatch(token)):
            return bytes([int(byte[1], 16)])
        return token.replace("▁", " ").encode()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _end_of_turn_ids(self) -> set[int]:
        """The special token the template closes an assistant turn with (ChatML's <|im_end|>)."""
        from jinja2 import TemplateError

        probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            text = self.hf.apply_chat_template(probe, tokenize=False)
        except (TemplateError, ValueError, TypeError):
            return set()
        if _PROBE_REPLY not in text:
            return set()
        after = text.rpartition(_PROBE_REPLY)[2].lstrip()
        names = {self.hf.convert_ids_to_tokens(i): i for i in self._special_ids}
        matches = [name for name in names if after.startswith(name)]
        return {names[max(matches, key=len)]} if matches else set()


def _auto_tokenizer(source: Path, directory: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise TokenizerError(f"{source}: cannot load its tokenizer ({e})") from e


def _generation_config_eos_ids(directory: Path) -> set[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{path}: unreadable ({e})") from e
    return {eos} if isinstance(eos, int) else {t for t in eos or () if isinstance(t, int)}


def _hf_message(message: dict) -> dict:
    """OpenAI's message shape → what chat templates expect: string content, arguments as objects."""
    message = dict(message)
    if message["role"] == "developer":
        message["role"] = "system"
    if isinstance(message.get("content"), list):
        message["content"] = "\n".join(part["text"] for part in message["content"])
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_hf_tool_call(call) for call in message["tool_calls"]]
    return message


def _hf_tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _decoder_types(hf: Any) -> set[str]:
    """The kinds of the fast tokenizer's decoder steps, e.g. {"ByteLevel"} or {"Sequence", "ByteFallback", ...}."""
    try:
        decoder = json.loads(hf.backend_tokenizer.to_str())["decoder"]
    except (AttributeError, KeyError, ValueError):
        return set()
    types, stack = set(), [decoder]
    while stack:
        step = stack.pop()
        if isinstance(step, dict):
            types.add(step.get("type"))
            stack.extend(step.get("decoders") or ())
    return types


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte: printable bytes stand for themselves, the rest
    for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL_DECODER = _byte_level_decoder()


# loading

def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer of a checkpoint directory (Mistral-native or Hugging Face), of a GGUF file, or a
    Mistral tokenizer file itself (tekken.json, tokenizer.model.vN)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return HFTokenizer.from_gguf(path)
        if path.name.endswith(".json") or re.search(r"\.model(\.v\d+(m\d+)?)?$", path.name):
            return MistralCommonTokenizer.from_file(path)
        raise TokenizerError(f"{path}: expected a checkpoint directory, a .gguf file or a Mistral tokenizer file")
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such checkpoint")
    if mistral_file := _mistral_tokenizer_file(path):
        return MistralCommonTokenizer.from_file(mistral_file)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return HFTokenizer.from_dir(path)
    raise TokenizerError(f"{path}: no tokenizer found (looked for tekken.json, tokenizer.model.v*, "
                         "tokenizer.model and tokenizer.json)")


def _mistral_tokenizer_file(directory: Path) -> Path | None:
    if (directory / "tekken.json").is_file():
        return directory / "tekken.json"
    versioned = [p for p in directory.glob("tokenizer.model.v*") if re.fullmatch(r"v\d+(m\d+)?", p.suffix[1:])]
    if versioned:
        return max(versioned, key=lambda p: int(re.match(r"\.v(\d+)", p.suffix)[1]))
    if (directory / "tokenizer.model").is_file():
        return directory / "tokenizer.model"
    return None
