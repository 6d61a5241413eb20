"""mistral-serve: self-hosted serving of Mistral-7B-Instruct."""

__version__ = "0.1.0"
