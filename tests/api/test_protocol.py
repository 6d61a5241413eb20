"""Request parsing details that no HTTP test shows: role names and the model's sampling defaults."""

from mistral_serve.api.protocol import ChatCompletionRequest, SystemMessage

HELLO = [{"role": "user", "content": "Hello"}]


def test_the_developer_role_is_the_system_role():
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "developer", "content": "Be brief."}, *HELLO]})
    assert isinstance(request.messages[0], SystemMessage)
    assert request.messages[0].model_dump(exclude_none=True) == {"role": "system", "content": "Be brief."}


def test_the_models_defaults_apply_only_to_what_a_request_leaves_out():
    left_out = ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO})
    params = left_out.to_sampling_params(temperature=0.2, top_p=0.9)
    assert (params.temperature, params.top_p) == (0.2, 0.9)
    assert (left_out.to_sampling_params().temperature, left_out.to_sampling_params().top_p) == (1.0, 1.0)
    given = ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, "temperature": 1, "top_p": None})
    params = given.to_sampling_params(temperature=0.2, top_p=0.9)
    assert (params.temperature, params.top_p) == (1.0, 0.9)


def test_what_the_openai_client_adds_to_a_parsed_message_is_accepted_and_left_out_of_the_prompt():
    """openai's chat.completions.parse() returns messages carrying `parsed` and `parsed_arguments`;
    sent back as they are, they are accepted and never reach the prompt."""
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": '{"a": 1}', "refusal": None, "parsed": {"a": 1}, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": '{"b": 2}', "parsed_arguments": {"b": 2}}}]}]})
    assert request.messages[1].model_dump(exclude_none=True) == {
        "content": '{"a": 1}', "role": "assistant",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"b": 2}'}}]}
