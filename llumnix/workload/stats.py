"""How each length source compares with Table 1: ``llumnix trace-stats`` writes this table.

Statistics are the mean and numpy's default (linearly interpolated) percentiles, as the artifact's own analysis
prints them. Rows per distribution: Table 1 itself, the authors' generator (under the artifact's own seeded stream,
under one seed here, and the spread over many seeds), the Table-1 fits of ``--lengths table1`` and, for ShareGPT,
real rows under each tokenizer and reading that is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.workload.datasets import burstgpt, sharegpt
from llumnix.workload.lengths import POWER_LAW_BY_LETTER, TABLE1, TABLE1_QUANTILES
from llumnix.workload.sharegpt_data import row_lengths, usable_rows
from llumnix.workload.tokenizer import TokenCounter
from llumnix.workload.zipf import ZIPF_BY_LETTER

#: The artifact's seed for every run (``random.seed(0xCADE)``; ``np.random.seed(0xCADE)``).
ARTIFACT_SEED = 0xCADE
#: Requests per run in the artifact's configs: the size of its length batches.
ARTIFACT_BATCH = 10_000

STAT_COLUMNS = ("mean", "p50", "p80", "p95", "p99")
TABLE_COLUMNS = ("distribution", "source", "n", *STAT_COLUMNS, "max_rel_dev")
_LETTER_NAMES = {"S": "short", "M": "medium", "L": "long"}


def length_stats(x: np.ndarray) -> dict[str, float]:
    """Mean and P50 / P80 / P95 / P99 (numpy's linear interpolation)."""
    x = np.asarray(x, dtype=float)
    return dict(zip(STAT_COLUMNS, [x.mean(), *np.percentile(x, np.array(TABLE1_QUANTILES) * 100)], strict=True))


@dataclass
class _Rows:
    records: list[dict]

    def add(self, distribution: str, source: str, stats: dict[str, float], n: int | str) -> None:
        target = TABLE1[distribution].percentiles_tokens
        got = np.array([stats[c] for c in STAT_COLUMNS[1:]])
        self.records.append({"distribution": distribution, "source": source, "n": n, **stats,
                             "max_rel_dev": float(np.abs(got / target - 1).max())})

    def add_table1(self, distribution: str) -> None:
        t = TABLE1[distribution]
        stats = dict(zip(STAT_COLUMNS, [t.mean_tokens, *t.percentiles_tokens.tolist()], strict=True))
        self.add(distribution, "Table 1 (paper)", stats, "")


def generated_rows(seed: int, draws: int, seeds: int) -> pd.DataFrame:
    """Short / Medium / Long: Table 1 vs the authors' generator and the Table-1 fit."""
    rows = _Rows([])
    for letter, name in _LETTER_NAMES.items():
        zipf = ZIPF_BY_LETTER[letter]
        rows.add_table1(name)
        artifact = zipf.sample(ARTIFACT_BATCH, np.random.RandomState(ARTIFACT_SEED))
        rows.add(name, "authors' generator, the artifact's stream (RandomState(0xCADE), first batch)",
                 length_stats(artifact), ARTIFACT_BATCH)
        rows.add(name, f"authors' generator, default_rng({seed})", length_stats(zipf.sample(draws,
                 np.random.default_rng(seed))), draws)
        per_seed = pd.DataFrame([length_stats(zipf.sample(ARTIFACT_BATCH, np.random.default_rng(s)))
                                 for s in range(seeds)])
        for label, q in (("median", 0.5), ("2.5th percentile", 0.025), ("97.5th percentile", 0.975)):
            rows.add(name, f"authors' generator, {label} over seeds 0-{seeds - 1}", per_seed.quantile(q).to_dict(),
                     f"{seeds} x {ARTIFACT_BATCH}")
        fit = POWER_LAW_BY_LETTER[letter].sample(draws, np.random.default_rng(seed))
        rows.add(name, f"Table-1 power-law fit (--lengths table1), default_rng({seed})", length_stats(fit), draws)
    return pd.DataFrame(rows.records, columns=list(TABLE_COLUMNS))


def dataset_rows(seed: int, draws: int, sharegpt_path: Path | None, counters: list[TokenCounter],
                 num_requests: int = ARTIFACT_BATCH) -> pd.DataFrame:
    """ShareGPT and BurstGPT: Table 1 vs the stand-ins and, where the file is given, real ShareGPT rows."""
    rows = _Rows([])
    stand_ins = {"sharegpt": sharegpt(draws, np.random.default_rng(seed)),
                 "burstgpt": burstgpt(draws, np.random.default_rng(seed))}
    for dataset, pairs in stand_ins.items():
        for side, values in (("input", pairs.prompt_tokens), ("output", pairs.output_tokens)):
            name = f"{dataset}_{side}"
            rows.add_table1(name)
            rows.add(name, f"Table-1 stand-in, default_rng({seed})", length_stats(values), draws)
            if dataset != "sharegpt" or sharegpt_path is None:
                continue
            for counter in counters:
                table = row_lengths(sharegpt_path, counter)
                for require_roles, reading in ((True, "turns 0-1 human -> model (default)"),
                                               (False, "turns 0-1 whatever their roles (the artifact's literal)")):
                    head = usable_rows(table, require_roles=require_roles).iloc[:num_requests]
                    column = "prompt_tokens" if side == "input" else "completion_tokens"
                    rows.add(name, f"ShareGPT V3 rows, {reading}, first {len(head)}, {counter.name}",
                             length_stats(head[column].to_numpy()), len(head))
    return pd.DataFrame(rows.records, columns=list(TABLE_COLUMNS))


def render_markdown(table: pd.DataFrame, header: str) -> str:
    """The table as GitHub markdown, one block per distribution."""
    lines = [header.rstrip(), ""]
    for distribution, group in table.groupby("distribution", sort=False):
        lines += [f"### {distribution}", "", "| source | n | mean | P50 | P80 | P95 | P99 | max dev. P50-P99 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in group.itertuples(index=False):
            values = " | ".join(f"{getattr(r, c):,.0f}" if c != "mean" else f"{r.mean:,.1f}" for c in STAT_COLUMNS)
            dev = "" if r.source.startswith("Table 1") else f"{r.max_rel_dev:.1%}"
            lines.append(f"| {r.source} | {r.n} | {values} | {dev} |")
        lines.append("")
    return "\n".join(lines)

