"""Tokenizer files for the tokenizer tests: the test files mistral-common ships in its package data,
put in checkpoint directories, and SentencePiece's own view of them."""

import importlib.resources
from pathlib import Path
import shutil

import sentencepiece

MISTRAL_DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
V1_FILE = MISTRAL_DATA / "tokenizer.model.v1"
V2_FILE = MISTRAL_DATA / "mistral_instruct_tokenizer_240216.model.v2"
V3_FILE = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"
V7_FILE = MISTRAL_DATA / "mistral_instruct_tokenizer_241114.model.v7"
TEKKEN_FILE = MISTRAL_DATA / "tekken_240718.json"


def checkpoint_dir(tmp_path_factory, source: Path, name: str) -> Path:
    """A checkpoint directory holding only `source`, under the name a checkpoint would give it."""
    directory = tmp_path_factory.mktemp(name.replace(".", "-"))
    shutil.copy(source, directory / name)
    return directory


def piece_id(file: Path, piece: str) -> int:
    """A SentencePiece piece's id, read with sentencepiece itself."""
    return sentencepiece.SentencePieceProcessor(model_file=str(file)).piece_to_id(piece)
