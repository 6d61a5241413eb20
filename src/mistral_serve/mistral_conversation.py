"""OpenAI conversations as mistral-common takes them, placed by Mistral's own rules.

OpenAI accepts a system (or developer) message anywhere, and runs of messages of one role;
mistral-common's validator refuses a system message after an assistant or a tool message. This
module changes only that: what mistral-common's normalizer and encoders do with the messages is
theirs, untouched.

Where a system message ends up:

- Tokenizers v1, v2 and v3 (Mistral-7B-Instruct v0.1, v0.2, v0.3; Tekken files of v3, such as
  Mistral NeMo's) have one system prompt: mistral-common's normalizer joins every system message's
  text, a blank line between, wherever the messages stand. Their position carries nothing, so they
  move to the front before mistral-common sees them; user or assistant messages that stood on
  either side of them are then a run of one role, which mistral-common merges (a blank line
  between). The encoder puts the system prompt at the start of the first user turn (v1) or of the
  last one (v2, v3).
- Tokenizers v7 and later keep each system message where it stands, as a [SYSTEM_PROMPT] block,
  so there it stays; mistral-common's order rules hold for the other messages.

Either way, system messages aside, the conversation must end with a user or a tool message: the
format opens the assistant's turn only after one. The `name` of a system, user or assistant
message is dropped, as the format has no place for it; tool-call ids are mapped to the 9 letters
or digits the format allows.
"""

from __future__ import annotations

from mistral_common.exceptions import InvalidMessageStructureException
from mistral_common.protocol.instruct.messages import Roles
from mistral_common.protocol.instruct.validator import MistralRequestValidator, ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import TokenizerVersion

from mistral_serve.tool_call_ids import mistral_tool_call_id

__all__ = ["conversation_validator", "mistral_messages"]

_ONE_SYSTEM_PROMPT_VERSIONS = frozenset({TokenizerVersion.v1, TokenizerVersion.v2, TokenizerVersion.v3})


def mistral_messages(messages: list[dict], version: TokenizerVersion) -> list[dict]:
    """OpenAI-shaped messages as mistral-common's `ChatCompletionRequest.from_openai` should get them."""
    messages = [_mistral_message(message) for message in messages]
    if version in _ONE_SYSTEM_PROMPT_VERSIONS:
        # a stable sort: the system messages keep their order, and so do the others
        messages.sort(key=lambda message: message["role"] != "system")
    return messages


def _mistral_message(message: dict) -> dict:
    message = {"content": None, **message}
    if message["role"] == "developer":
        message["role"] = "system"
    if message["role"] != "tool":  # a tool message's name is its function's, which the format has
        message.pop("name", None)
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [
            {**call, "id": mistral_tool_call_id(call["id"])}
            if isinstance(call, dict) and isinstance(call.get("id"), str) else call
            for call in message["tool_calls"]]
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        message["tool_call_id"] = mistral_tool_call_id(call_id) if isinstance(call_id, str) else call_id
    return message


class _SystemMessagesAnywhere:
    """Mixed in before mistral-common's validator of a version: its order and last-message rules
    are checked on the conversation without its system messages, which may stand anywhere."""

    def _validate_message_order(self, messages: list) -> None:
        super()._validate_message_order(_without_system(messages))

    def _validate_message_list_structure(self, messages: list) -> None:
        super()._validate_message_list_structure(messages)
        conversation = _without_system(messages)
        if conversation and conversation[-1] is not messages[-1]:  # the last one is already checked
            self._validate_last_message(conversation[-1])

    def _validate_last_message(self, message) -> None:
        # mistral-common's own message offers a continued assistant message ("prefix"), which the
        # OpenAI API has no way to ask for
        if message.role == Roles.assistant and not message.prefix:
            raise InvalidMessageStructureException(
                "the last message, system messages aside, must be from the user or a tool, not the "
                "assistant: Mistral's prompt format opens the assistant's turn only after one of those")
        super()._validate_last_message(message)


def _without_system(messages: list) -> list:
    return [message for message in messages if message.role != Roles.system]


def conversation_validator(version: TokenizerVersion) -> MistralRequestValidator:
    """mistral-common's serving validator for `version`, taking system messages anywhere."""
    reference = type(get_validator(version, mode=ValidationMode.serving))
    validator = type(f"{reference.__name__}WithSystemAnywhere", (_SystemMessagesAnywhere, reference), {})
    return validator(mode=ValidationMode.serving)
