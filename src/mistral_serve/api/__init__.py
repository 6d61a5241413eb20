"""The HTTP face of mistral-serve: OpenAI-compatible routes over the engine. `create_app` wires it."""
