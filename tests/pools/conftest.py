"""The pool tests validate replies against OpenAI's document as the API tests do."""

from tests.api.conftest import openai_schema  # noqa: F401 (a fixture)
