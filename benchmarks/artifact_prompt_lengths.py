"""How long the artifact's generated prompts are once its engine re-tokenises them, against the drawn lengths.

The artifact (osdi24ae ``benchmarks-repo/benchmark_throughput.py`` lines 788-819) turns each drawn prompt length
``l`` into text: ``l`` random token ids in [10, vocab_size] (``random.randint``, so 32,000 itself, one past the
vocabulary, is possible and decodes to nothing), decoded; re-encoded (with BOS) and, when longer than ``l``, cut to
its first ``l - 1`` ids (BOS included) and decoded again (without skipping special tokens). The server re-encodes
that text (``vllm/entrypoints/api_server.py`` ``generate_v2``). This replays those steps with LLaMA's tokenizer
(:func:`llumnix.workload.tokenizer.llama_tokenizer_from_js`, a fast tokenizer as ``AutoTokenizer`` would load)
and reports the engine's prompt length against the drawn one.

Run (needs ``make sharegpt`` or the ``tokenizers`` package and the LLaMA tokenizer file):
    .venv/bin/python benchmarks/artifact_prompt_lengths.py [--prompts 2000] [--out benchmarks/artifact_prompt_lengths.csv]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import pandas as pd

from llumnix.workload.tokenizer import LLAMA_VOCAB_SIZE, find_tokenizer_js, llama_tokenizer_from_js
from llumnix.workload.zipf import ZIPF_BY_LETTER


def engine_length(tokenizer, drawn: int, rng: random.Random) -> int:
    ids = [rng.randint(10, LLAMA_VOCAB_SIZE) for _ in range(drawn)]
    prompt = tokenizer.decode(ids, skip_special_tokens=False)
    encoded = tokenizer.encode(prompt).ids
    if len(encoded) > drawn:
        prompt = tokenizer.decode(encoded[: drawn - 1], skip_special_tokens=False)
    return len(tokenizer.encode(prompt).ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000, help="Prompts per length distribution.")
    parser.add_argument("--out", default=None, help="CSV to write (one row per distribution).")
    args = parser.parse_args()
    path = find_tokenizer_js()
    if path is None:
        raise SystemExit("no LLaMA tokenizer: run `make llama-tokenizer` (or set LLUMNIX_LLAMA_TOKENIZER_JS)")
    tokenizer = llama_tokenizer_from_js(path)
    rows = []
    for letter, zipf in ZIPF_BY_LETTER.items():
        drawn = zipf.sample(args.prompts, np.random.default_rng(0))
        rng = random.Random(0xCADE)
        engine = np.array([engine_length(tokenizer, int(n), rng) for n in drawn])
        ratio = engine / drawn
        rows.append({"lengths": letter, "prompts": args.prompts, "drawn_mean": drawn.mean(),
                     "engine_mean": engine.mean(), "mean_ratio": engine.mean() / drawn.mean(),
                     "ratio_p50": np.median(ratio), "ratio_p99": np.percentile(ratio, 99),
                     "share_longer": float(np.mean(engine > drawn)), "share_shorter": float(np.mean(engine < drawn))})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.out:
        table.to_csv(args.out, index=False, float_format="%.4f")


if __name__ == "__main__":
    main()
