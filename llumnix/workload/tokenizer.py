"""Token counts for dataset text: the LLaMA-1/2 tokenizer when it is installed, else a documented approximation.

The authors count ShareGPT lengths with LLaMA-7B's tokenizer, ``len(tokenizer(text).input_ids)``, which includes the
BOS token (``benchmarks-repo/benchmark_throughput.py`` lines 853-857, osdi24ae). Both counters here count that BOS
too, so a text's count is what the artifact's engine was given.

LLaMA tokenizer, offline. No PyPI package is known to ship LLaMA's vocabulary; the npm package
``llama-tokenizer-js`` (MIT; 1.2.2) bakes the LLaMA-1 vocabulary (32,000 pieces, the same as LLaMA-2's) and its
61,249 BPE merges into ``llama-tokenizer.js`` as two base64 strings. :func:`llama_tokenizer_from_js` reads those
and builds the equivalent Hugging Face fast tokenizer with the ``tokenizers`` package (PyPI): BPE with byte
fallback, a ``▁`` prepended and spaces replaced by ``▁`` (SentencePiece's dummy prefix; LLaMA has no other
normaliser), BOS added. It gives the reference ids (``"Hello, my dog is cute"`` -> ``[1, 15043, 29892, 590, 11203,
338, 274, 1082]``) and, checked on 3,007 ShareGPT texts, the same count as llama-tokenizer-js itself on every one
except the empty string (llama-tokenizer-js: 0 tokens; Hugging Face: 1, the BOS). Get the file with
``make llama-tokenizer`` (npm pack, into the data cache) or point ``LLUMNIX_LLAMA_TOKENIZER_JS`` at it.

Approximation. Without it, :func:`approx_token_count` counts regex pieces (+1 for the BOS). On the first 10,000
usable ShareGPT V3 rows it undercounts the LLaMA tokenizer by about 9% in total (prompts 0.91x, completions 0.92x;
``docs/workload-lengths.md``): every trace built with it says so in its metadata and the log.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Environment variable naming a ``llama-tokenizer.js`` file (from the npm package ``llama-tokenizer-js``).
TOKENIZER_ENV = "LLUMNIX_LLAMA_TOKENIZER_JS"
#: Environment variable naming the data cache folder (default ``~/.cache/llumnix``).
CACHE_ENV = "LLUMNIX_DATA_CACHE"
#: File name of the npm package's tokenizer inside the cache (``make llama-tokenizer`` puts it there).
TOKENIZER_JS_NAME = "llama-tokenizer.js"

LLAMA_VOCAB_SIZE = 32000
BOS_ID = 1

_VOCAB_RE = re.compile(r'const llama_vocab_base64 = "([A-Za-z0-9+/=]+)"')
_MERGES_RE = re.compile(r'const llama_merges_binary = "([A-Za-z0-9+/=]+)"')

# Pieces of text that a LLaMA-style BPE tokenizer usually turns into about one token each: a run of up to eight ASCII
# letters (common English words are one token, long words split into several), a single digit (LLaMA splits numbers
# into digits), or any other single non-space character (punctuation, CJK characters, symbols).
_TOKEN_PIECE = re.compile(r"[A-Za-z]{1,8}|\d|[^\sA-Za-z\d]")


def approx_token_count(text: str) -> int:
    """Approximate LLaMA token count of ``text`` without BOS; at least 1.

    A regex piece count rather than characters / 4: it counts code, numbers and non-English text more sensibly, and
    it is deterministic and dependency-free. It undercounts English prose by ~9% (see the module docstring).
    """
    return max(1, len(_TOKEN_PIECE.findall(text)))


def data_cache_dir() -> Path:
    """``$LLUMNIX_DATA_CACHE``, else ``~/.cache/llumnix``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llumnix")


@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of texts, BOS included. ``name`` identifies the tokenizer (it keys the length cache)."""

    name: str
    is_llama: bool
    _tokenizer: object | None = field(default=None, repr=False, compare=False)

    def count(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts (int64), one per text, each including the BOS token."""
        if self._tokenizer is None:
            return np.array([approx_token_count(t) + 1 for t in texts], dtype=np.int64)
        encodings = self._tokenizer.encode_batch(list(texts))
        return np.array([len(e.ids) for e in encodings], dtype=np.int64)


APPROX_COUNTER = TokenCounter(name="approx-regex-v1", is_llama=False)


def _decode_js(text: str, path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    vocab_match, merges_match = _VOCAB_RE.search(text), _MERGES_RE.search(text)
    if vocab_match is None or merges_match is None:
        raise ValueError(
            f"{path}: no llama_vocab_base64 / llama_merges_binary constants. Fix: point {TOKENIZER_ENV} at "
            "llama-tokenizer.js from the npm package llama-tokenizer-js (make llama-tokenizer)."
        )
    vocab = base64.b64decode(vocab_match.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_match.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    if len(vocab) != LLAMA_VOCAB_SIZE or vocab[BOS_ID] != "<s>" or len(ids) % 2:
        raise ValueError(f"{path}: not LLaMA's vocabulary ({len(vocab)} pieces, BOS {vocab[BOS_ID]!r}).")
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]
    return vocab, merges


def llama_tokenizer_from_js(path: str | Path):
    """A ``tokenizers.Tokenizer`` equal to LLaMA's, built from llama-tokenizer-js's baked-in vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    vocab, merges = _decode_js(path.read_text(encoding="utf-8"), path)
    bpe = models.BPE({piece: i for i, piece in enumerate(vocab)}, merges, unk_token="<unk>", fuse_unk=True,
                     byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def find_tokenizer_js() -> Path | None:
    """``$LLUMNIX_LLAMA_TOKENIZER_JS``, else ``<data cache>/llama-tokenizer.js``, if the file exists."""
    configured = os.environ.get(TOKENIZER_ENV)
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ValueError(f"{TOKENIZER_ENV}={configured}: no such file. Fix: correct it or unset it.")
        return path
    path = data_cache_dir() / TOKENIZER_JS_NAME
    return path if path.is_file() else None


def token_counter() -> TokenCounter:
    """The LLaMA tokenizer when ``tokenizers`` and llama-tokenizer.js are both present, else the approximation."""
    path = find_tokenizer_js()
    if path is None:
        log.warning("no LLaMA tokenizer (%s); counting tokens with the regex approximation (~9%% low). Fix: "
                    "make llama-tokenizer, or set %s.", data_cache_dir() / TOKENIZER_JS_NAME, TOKENIZER_ENV)
        return APPROX_COUNTER
    try:
        tokenizer = llama_tokenizer_from_js(path)
    except ImportError:
        log.warning("%s found but the 'tokenizers' package is missing (pip install -e .[sharegpt]); "
                    "counting tokens with the regex approximation (~9%% low)", path)
        return APPROX_COUNTER
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return TokenCounter(name=f"llama-js-{digest}", is_llama=True, _tokenizer=tokenizer)
