"""Reading checkpoints: Hugging Face, Mistral native and GGUF files, into a `Transformer`."""
