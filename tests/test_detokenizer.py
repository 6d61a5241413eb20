"""IncrementalDetokenizer: the deltas add up to tokenizer.decode(all ids), and never split a character.

Run on v1 (SentencePiece with byte fallback), v3 (control tokens) and the demo (byte-level BPE).
"""

from __future__ import annotations

import random

import pytest

from mistral_serve.detokenizer import IncrementalDetokenizer
from mistral_serve.tokenizer import ChatTokenizer
from tests.tokenizers import V1_FILE, piece_id

TEXTS = [
    "Hello, world!",
    " leading space and  two spaces",
    "two\nlines\n\nthen a blank one\n",
    "emoji 😀🦜 mixed in 🤖",
    "CJK: 日本語のテキスト 龘",
    "price: 5€ or €5",
    "accents: café, naïve, Ærø, Straẞe",
    "ℤ𝄞",
]


@pytest.fixture(params=["v1", "v3", "demo"])
def tokenizer(request) -> ChatTokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer, token_ids, **kwargs) -> tuple[list[str], str]:
    """Push the ids one by one: the deltas, and what flush() returns at the end."""
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detokenizer.push(t) for t in token_ids]
    tail = detokenizer.flush()
    assert detokenizer.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_v1_texts_exercise_byte_fallback(v1):
    # else the test above would not cover characters split over byte tokens
    ids = v1.encode("ℤ𝄞 龘 🦜")
    assert sum(v1.token_text(t) == "\ufffd" for t in ids) >= 8


def test_byte_tokens_release_a_character_once_complete(v1):
    euro = [piece_id(V1_FILE, f"<0x{b:02X}>") for b in "€".encode()]
    assert stream(v1, euro) == (["", "", "€"], "")


def test_demo_holds_a_character_split_over_tokens(demo):
    ids = demo.encode(" 😀")
    assert len(ids) > 1  # the emoji's bytes are spread over tokens
    deltas, _ = stream(demo, ids)
    assert deltas[-1].endswith("😀") and "".join(deltas) == " 😀"


def test_output_starting_with_a_space_token(v1):
    # "▁Paris" first: decode drops the space, and so must the first delta
    ids = v1.encode("Paris is the capital.")
    assert v1.token_text(ids[0]) == " Paris"
    deltas, _ = stream(v1, ids)
    assert deltas[0] == "Paris" and "".join(deltas) == "Paris is the capital."
    # a lone "▁" first: decode keeps the second token's space
    ids = [piece_id(V1_FILE, "▁"), piece_id(V1_FILE, "▁Paris")]
    deltas, _ = stream(v1, ids)
    assert "".join(deltas) == v1.decode(ids) == " Paris"


def test_special_tokens_are_skipped(v1, v3, demo):
    for tokenizer, special in [(v1, 2), (v3, 3), (demo, 2)]:  # </s>, [INST], <|im_end|>
        ids = [*tokenizer.encode("Hello"), special, *tokenizer.encode(" world")]
        deltas, _ = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)
        assert tokenizer.token_text(special) not in "".join(deltas)
        deltas, _ = stream(tokenizer, ids, skip_special_tokens=False)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=False)
        assert tokenizer.token_text(special) in "".join(deltas)


def test_invalid_bytes_at_the_end_come_out_of_flush(v1):
    ids = [*v1.encode("ab"), piece_id(V1_FILE, "<0xE2>")]
    deltas, tail = stream(v1, ids)
    assert deltas[-1] == "" and tail == "\ufffd"
    assert "".join(deltas) + tail == v1.decode(ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences(tokenizer, skip_special_tokens):
    # any ids at all, special and byte tokens included: the sum of the deltas is still decode()
    rng = random.Random(1234)
    common = tokenizer.encode(" ".join(TEXTS)) + sorted(tokenizer.eos_token_ids)
    for _ in range(60):
        ids = [rng.randrange(tokenizer.vocab_size) if rng.random() < 0.5 else rng.choice(common) for _ in range(30)]
        deltas, tail = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


class CountingTokenizer:
    """Forwards decode() to a real tokenizer and remembers how many ids each call was given."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, token_ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_short_window_not_the_whole_output(v1):
    ids = v1.encode(" ".join(TEXTS) * 5)
    counting = CountingTokenizer(v1)
    deltas, _ = stream(counting, ids)
    assert len(ids) > 300
    assert "".join(deltas) == v1.decode(ids)
    assert max(counting.decoded_lengths) <= 8
