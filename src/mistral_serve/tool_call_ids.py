"""Tool-call ids in Mistral's format: exactly 9 letters or digits. The one place that says so:
the ids the server gives calls (api/tools.py) and the ids it maps clients' ids to
(mistral_conversation.py)."""

from __future__ import annotations

import hashlib
import secrets
import string

TOOL_CALL_ID_LENGTH = 9
TOOL_CALL_ID_ALPHABET = string.digits + string.ascii_letters


def is_tool_call_id(text: str) -> bool:
    return len(text) == TOOL_CALL_ID_LENGTH and all(char in TOOL_CALL_ID_ALPHABET for char in text)


def new_tool_call_id() -> str:
    return "".join(secrets.choice(TOOL_CALL_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def mistral_tool_call_id(client_id: str) -> str:
    """The id Mistral's format allows for a client's tool-call id.

    Valid ids are kept; any other id maps to a hash of itself, so an assistant's tool call and
    the tool message answering it keep matching ids.
    """
    if is_tool_call_id(client_id):
        return client_id
    number = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(TOOL_CALL_ID_LENGTH):
        number, index = divmod(number, len(TOOL_CALL_ID_ALPHABET))
        chars.append(TOOL_CALL_ID_ALPHABET[index])
    return "".join(chars)
