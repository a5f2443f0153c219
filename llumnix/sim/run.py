"""Run one simulation from a trace file and write its tables: the body of ``llumnix simulate``."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from llumnix.core.migration import MigrationPhase
from llumnix.core.request import Request
from llumnix.metrics import request_table, summarize
from llumnix.sim.simulator import SimConfig, SimResult, Simulator

log = logging.getLogger(__name__)


def requests_from_trace(df: pd.DataFrame) -> list[Request]:
    return [
        Request(int(r.request_id), float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens), int(r.priority))
        for r in df.itertuples(index=False)
    ]


MIGRATION_COLUMNS = (
    "migration_id", "request_id", "src", "dst", "start_s", "end_s", "stages", "blocks", "downtime_s", "committed",
    "abort_reason",
)


def migration_table(result: SimResult) -> pd.DataFrame:
    rows = [
        (
            m.migration_id, m.request.request_id, m.src.instance_id, m.dst.instance_id, m.start_s, m.end_s,
            len(m.stages), m.bytes_blocks, m.downtime_s, m.phase is MigrationPhase.COMMITTED, m.abort_reason or "",
        )
        for m in result.migrations
    ]
    return pd.DataFrame.from_records(rows, columns=list(MIGRATION_COLUMNS))


def migration_summary(mig: pd.DataFrame, kv_bytes_per_block: int) -> dict:
    done = mig.loc[mig["committed"].astype(bool)]
    return {
        "migration_attempts": int(len(mig)),
        "migration_aborts": int(len(mig) - len(done)),
        "migration_downtime_mean_s": float(done["downtime_s"].mean()) if len(done) else 0.0,
        "migration_downtime_p99_s": float(done["downtime_s"].quantile(0.99)) if len(done) else 0.0,
        "migration_bytes": int(done["blocks"].sum()) * kv_bytes_per_block,
    }


def write_outputs(out_dir: Path, requests: pd.DataFrame, instances: pd.DataFrame, summary: dict, **tables) -> None:
    """Write the tables, then ``summary.json`` last and atomically: its presence means the run is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(out_dir / "requests.parquet", index=False)
    instances.to_parquet(out_dir / "instances.parquet", index=False)
    for name, table in tables.items():
        table.to_parquet(out_dir / f"{name}.parquet", index=False)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, out_dir / "summary.json")


def run_simulation(trace: pd.DataFrame, profile, config: SimConfig, out_dir: Path, progress: bool = True) -> dict:
    requests = requests_from_trace(trace)
    sim = Simulator(requests, profile, config)
    t0 = time.perf_counter()
    with tqdm(total=len(requests), desc="simulating", unit="req", disable=not progress, leave=False) as bar:
        result = sim.run(progress=bar.update)
    wall = time.perf_counter() - t0
    req_df = request_table(result.requests)
    inst_df = pd.DataFrame(result.samples)
    mig_df = migration_table(result)
    summary = summarize(
        req_df,
        inst_df,
        avg_instances=result.avg_instances,
        migrations=migration_summary(mig_df, profile.block_size * profile.kv_bytes_per_token),
        extra={
            "policy": config.system.policy,
            "migration_enabled": config.system.migration and config.system.policy == "llumnix",
            "priorities": config.system.priorities,
            "autoscale": config.system.autoscale is not None,
            "instances": config.num_instances,
            "profile": profile.name,
            "seed": config.seed,
            "sim_end_s": result.end_s,
            "wall_s": wall,
            "speedup_vs_real_time": result.end_s / wall if wall > 0 else float("inf"),
        },
    )
    write_outputs(out_dir, req_df, inst_df, summary, migrations=mig_df)
    log.info("simulated %d requests (%.0f virtual s) in %.1f s -> %s", len(requests), result.end_s, wall, out_dir)
    return summary
