"""A pool of remote OpenAI-compatible chat servers (our own `mistral-serve engine` processes, vLLM,
SGLang, llama-server, or a router in front of many) that serves one catalog model id: its
configuration, the routing policies, each member's health, and the streams it opens.

Nothing here imports the API or the engine, and nothing imports torch: a gateway that serves only
remote models never loads it."""
