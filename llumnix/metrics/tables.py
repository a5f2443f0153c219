"""The tables every run writes, with declared columns, built the same way for simulated and real runs.

- ``requests.parquet``: one row per request (``request_table``, ``REQUEST_COLUMNS``);
- ``instances.parquet``: one row per live instance per sample, with the cluster's fragmentation at that moment
  (``instance_rows``, ``INSTANCE_COLUMNS``);
- ``migrations.parquet``: one row per migration attempt (``migration_table``, the fields of ``MigrationRecord``);
- ``steps.parquet`` (real runs): one row per engine step (``step_table``, the fields of ``StepRecord``);
- ``summary.json``: ``llumnix.metrics.summary.summarize`` over these, written last (``write_outputs``).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.core.records import MigrationRecord, StepRecord
from llumnix.core.request import Request

REQUEST_COLUMNS = (
    "request_id", "priority", "arrival_s", "prompt_tokens", "output_tokens", "dispatch_s", "first_token_s",
    "finish_s", "prefill_latency_s", "decode_latency_s", "e2e_latency_s", "num_generated", "num_preemptions",
    "preemption_loss_s", "num_migrations", "num_migration_aborts", "migration_downtime_s", "instances",
)  # fmt: skip
INSTANCE_COLUMNS = (
    "time_s", "instance_id", "alive", "running", "waiting", "used_blocks", "free_blocks", "freeness", "draining",
    "fragmentation",
)  # fmt: skip
MIGRATION_COLUMNS = tuple(f.name for f in fields(MigrationRecord))
STEP_COLUMNS = (*(f.name for f in fields(StepRecord)), "duration_s")


# -- requests --------------------------------------------------------------------------------------------------------
def preemption_loss_s(r: Request) -> float:
    """Per preemption, the time from being preempted to finishing the next prefill (the wait plus the recompute)."""
    loss = 0.0
    for t in r.preemptions_s:
        i = bisect.bisect_right(r.prefill_ends_s, t)
        end = r.prefill_ends_s[i] if i < len(r.prefill_ends_s) else r.finish_s
        loss += (end if end is not None else t) - t
    return loss


def request_table(requests: Iterable[Request]) -> pd.DataFrame:
    """One row per request with its timeline and latencies."""
    rows = []
    for r in requests:
        decode = (
            (r.finish_s - r.first_token_s) / (r.output_tokens - 1)
            if r.output_tokens > 1 and r.finish_s is not None and r.first_token_s is not None
            else np.nan
        )
        committed = [m for m in r.migrations if m.committed]
        rows.append((
            r.request_id, r.priority, r.arrival_s, r.prompt_tokens, r.output_tokens, r.dispatch_s, r.first_token_s,
            r.finish_s, (r.first_token_s - r.arrival_s) if r.first_token_s is not None else np.nan, decode,
            (r.finish_s - r.arrival_s) if r.finish_s is not None else np.nan, r.num_generated, len(r.preemptions_s),
            preemption_loss_s(r), len(committed), len(r.migrations) - len(committed),
            sum(m.downtime_s for m in committed), ">".join(str(i) for i in r.instances),
        ))  # fmt: skip
    return pd.DataFrame.from_records(rows, columns=list(REQUEST_COLUMNS))


# -- instances -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceSample:
    """One instance's state at a sample: what ``instances.parquet`` records and fragmentation needs."""

    instance_id: int
    alive: bool
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    watermark_blocks: int
    head_demand_blocks: int  # blocks the head-of-line waiting request needs (0 when nothing waits)
    freeness: float
    draining: bool


def fragmentation(samples: Sequence[InstanceSample]) -> float:
    """The share of the cluster's free blocks left idle while some queued head-of-line request waits although the
    cluster as a whole, but no single instance, has room for it (0 when no request is stuck so)."""
    live = [s for s in samples if s.alive]
    if not live:
        return 0.0
    total = sum(s.total_blocks for s in live)
    free = {s.instance_id: s.free_blocks - s.watermark_blocks for s in live}
    cluster_free = sum(max(0, f) for f in free.values())
    max_free = max(free.values())
    fragmented = any(
        s.waiting
        and not s.draining
        and free[s.instance_id] < (d := s.head_demand_blocks)
        and cluster_free >= d
        and max_free < d
        for s in live
    )
    return cluster_free / total if fragmented and total else 0.0


def instance_rows(time_s: float, samples: Sequence[InstanceSample]) -> list[tuple]:
    """The ``INSTANCE_COLUMNS`` rows of one sample of the cluster."""
    frag = fragmentation(samples)
    return [
        (time_s, s.instance_id, s.alive, s.running, s.waiting, s.total_blocks - s.free_blocks, s.free_blocks,
         s.freeness if math.isfinite(s.freeness) else float("nan"), s.draining, frag)
        for s in samples
    ]


def instance_table(rows: Iterable[tuple]) -> pd.DataFrame:
    return pd.DataFrame.from_records(list(rows), columns=list(INSTANCE_COLUMNS))


# -- migrations and steps --------------------------------------------------------------------------------------------
def migration_table(records: Iterable[MigrationRecord]) -> pd.DataFrame:
    return pd.DataFrame.from_records([astuple(m) for m in records], columns=list(MIGRATION_COLUMNS))


def migration_summary(migrations: pd.DataFrame, kv_bytes_per_block: int) -> dict:
    """Attempts, aborts, downtime of the committed ones, and the bytes they moved."""
    done = migrations.loc[migrations["committed"].astype(bool)]
    return {
        "migration_attempts": int(len(migrations)),
        "migration_aborts": int(len(migrations) - len(done)),
        "migration_downtime_mean_s": float(done["downtime_s"].mean()) if len(done) else 0.0,
        "migration_downtime_p99_s": float(done["downtime_s"].quantile(0.99)) if len(done) else 0.0,
        "migration_bytes": int(done["blocks"].sum()) * kv_bytes_per_block,
    }


def step_table(records: Iterable[StepRecord]) -> pd.DataFrame:
    df = pd.DataFrame.from_records([astuple(s) for s in records], columns=list(STEP_COLUMNS[:-1]))
    df["duration_s"] = df["end_s"] - df["start_s"]
    return df


def records_from_rows(cls, rows: Iterable[dict]) -> list:
    """Records of ``cls`` (a record dataclass) from dicts, e.g. rows that crossed HTTP as JSON; raises on a missing
    field, naming it."""
    names = [f.name for f in fields(cls)]
    out = []
    for row in rows:
        missing = [n for n in names if n not in row]
        if missing:
            raise ValueError(f"{cls.__name__} row lacks {', '.join(missing)}: {row}")
        out.append(cls(**{n: row[n] for n in names}))
    return out


# -- writing a run ---------------------------------------------------------------------------------------------------
def write_outputs(out_dir: Path, requests: pd.DataFrame, instances: pd.DataFrame, summary: dict, **tables) -> None:
    """Write the tables, then ``summary.json`` last and atomically: its presence means the run is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(out_dir / "requests.parquet", index=False)
    instances.to_parquet(out_dir / "instances.parquet", index=False)
    for name, table in tables.items():
        table.to_parquet(out_dir / f"{name}.parquet", index=False)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, out_dir / "summary.json")
