"""Issue 19, item 2 in the serving cluster: how much a live migration slows its source's decode steps, and its
downtime, with ``llumnix serve``'s instance actors under Ray (two GPUs and ``--kv-transport nccl`` on the device
machine; CPU and gloo or the object store elsewhere).

For each prompt length, ``--repeats`` times: ``--background`` streamed requests (64 prompt tokens) keep the instances
decoding (where the dispatch policy puts them: ``source_batch`` in the CSV says how many the source had); a streamed
request of the length is migrated by ``POST /admin/migrate`` once it has ``--migrate-after``
tokens. Afterwards ``GET /admin/migrations`` and ``GET /admin/steps`` give, per committed migration, its stages,
blocks and downtime (freeze to commit, on the source's clock), and the source's decode steps that overlap the
non-final stages (start to the stop-and-copy stage) against the source's last ``--baseline-steps`` decode steps
before the migration began with the same batch size. A warm-up round first opens the KV channels both ways and
captures the decode graphs; its rows are not written. The raw step and migration logs go beside the output
(``-steps.csv``, ``-migrations.csv``), and the destination's decode steps while it receives the non-final stages
against its own before (``-destination.csv``; ``--reanalyze STEM`` writes it from a run's raw logs).

    python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 --kv-transport nccl \
        --lengths 512,2048,7680 -o benchmarks/h200x2-serve-migration-nccl.csv
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import threading

import httpx
import numpy as np
import pandas as pd

from llumnix.analysis.realrun import all_steps
from llumnix.runtime.frontend import BackgroundServer, init_ray
from llumnix.runtime.replay import admin_pages
from llumnix.runtime.serve_config import build_serve_config

BACKGROUND_PROMPT = 64


def stream(url: str, body: dict, on_tokens=None) -> tuple[str, list[int]]:
    """Stream one completion; ``on_tokens(request_id, tokens so far)`` after each chunk. Its id and tokens."""
    rid, tokens = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"completion failed ({resp.status_code}): {resp.read()!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"completion failed: {chunk}")
            rid = chunk["id"]
            tokens += chunk["choices"][0]["token_ids"]
            if on_tokens is not None:
                on_tokens(rid, tokens)
    return rid, tokens


def one_round(srv: BackgroundServer, prompt: list[int], output_tokens: int, background: int,
              migrate_at: list[int], seed: int) -> str:
    """Background requests (their prompts drawn from ``seed``), then the migrated one; returns its client request id
    once every request has finished. ``migrate_at``: its token counts at which a migration is asked for (again each
    chunk until one starts)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 1000, BACKGROUND_PROMPT).tolist() for _ in range(background)]
    ready = threading.Barrier(background + 1)
    errors: list[BaseException] = []

    def bg(i: int) -> None:
        first = threading.Event()
        body = {"prompt": prompts[i], "max_tokens": output_tokens + 32, "ignore_eos": True}
        try:
            stream(srv.url, body, lambda rid, toks: first.is_set() or (first.set(), ready.wait()))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=bg, args=(i,)) for i in range(background)]
    for t in threads:
        t.start()
    if background:
        ready.wait(timeout=600)  # every background request decoding: its prefill is not in the measured steps
    asked: list[int] = []

    def on_tokens(rid: str, tokens: list[int]) -> None:
        if len(asked) < len(migrate_at) and len(tokens) >= migrate_at[len(asked)]:
            got = httpx.post(f"{srv.url}/admin/migrate", json={"request_id": rid}, headers=srv.admin_headers,
                             timeout=60).json()
            if got.get("started"):
                asked.append(len(tokens))

    rid, tokens = stream(srv.url, {"prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True}, on_tokens)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if len(asked) != len(migrate_at) or len(tokens) != output_tokens:
        raise RuntimeError(f"request {rid}: migrations started after tokens {asked} of {migrate_at}, "
                           f"{len(tokens)} of {output_tokens} tokens")
    return rid


def migration_log(srv: BackgroundServer) -> list[dict]:
    """Every migration attempt the cluster logged (``GET /admin/migrations``, page after page)."""
    async def fetch() -> list[dict]:
        async with httpx.AsyncClient() as client:
            return await admin_pages(client, f"{srv.url}/admin/migrations", srv.admin_headers, timeout_s=60.0)

    return asyncio.run(fetch())


def _overlap(decode: pd.DataFrame, instance: int, start_s: float, end_s: float,
             baseline_steps: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """``instance``'s decode steps overlapping [start_s, end_s), its last ``baseline_steps`` before ``start_s`` with
    the batch size most of those had, and that batch size."""
    steps = decode[decode["instance_id"] == instance]
    during = steps[(steps["end_s"] > start_s) & (steps["start_s"] < end_s)]
    batch = int(during["batch_size"].mode().iloc[0]) if len(during) else 0
    before = steps[(steps["end_s"] <= start_s) & (steps["batch_size"] == batch)].tail(baseline_steps)
    return during, before, batch


def _decode_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The decode steps, each with its interval: its start to its instance's next step's (its duration and the gap
    before the next: the event loop's, the locks')."""
    steps = steps.sort_values("start_s").copy()
    steps["interval_s"] = steps.groupby("instance_id")["start_s"].shift(-1) - steps["start_s"]
    return steps[steps["kind"] == "decode"]


def slowdown_rows(migrations: list[dict], steps: pd.DataFrame, baseline_steps: int) -> list[dict]:
    """One row per committed migration: the source's decode steps during its non-final stages against before."""
    rows = []
    decode = _decode_steps(steps)
    for m in migrations:
        bulk_end = m["end_s"] - m["downtime_s"]
        during, before, batch = _overlap(decode, m["src"], m["start_s"], bulk_end, baseline_steps)
        step_before = float(before["duration_s"].mean()) if len(before) else float("nan")
        step_during = float(during["duration_s"].mean()) if len(during) else float("nan")
        rows.append({
            "client_request_id": m["client_request_id"], "src": m["src"], "dst": m["dst"], "stages": m["stages"],
            "blocks": m["blocks"], "downtime_s": m["downtime_s"], "migration_s": m["end_s"] - m["start_s"],
            "bulk_s": bulk_end - m["start_s"], "source_batch": batch, "steps_before": len(before),
            "steps_during": len(during), "decode_step_s": step_before, "decode_step_migrating_s": step_during,
            "decode_slowdown": step_during / step_before - 1, "downtime_over_step": m["downtime_s"] / step_before,
            "decode_step_median_s": before["duration_s"].median(),
            "decode_step_migrating_median_s": during["duration_s"].median(),
            "decode_interval_s": before["interval_s"].median(),
            "decode_interval_migrating_s": during["interval_s"].median(),
            "interval_slowdown": during["interval_s"].median() / before["interval_s"].median() - 1,
        })
    return rows


def destination_rows(migrations: list[dict], steps: pd.DataFrame, baseline_steps: int) -> list[dict]:
    """One row per committed migration: the destination's decode steps while it receives the non-final stages
    (the same window as the source's) against its own steps before, with the same batch."""
    rows = []
    decode = _decode_steps(steps)
    for m in migrations:
        during, before, batch = _overlap(decode, m["dst"], m["start_s"], m["end_s"] - m["downtime_s"], baseline_steps)
        rows.append({
            "client_request_id": m["client_request_id"], "dst": m["dst"], "dst_batch": batch,
            "dst_steps_before": len(before), "dst_steps_during": len(during),
            "dst_decode_step_s": before["duration_s"].mean(), "dst_decode_step_receiving_s": during["duration_s"].mean(),
            "dst_decode_slowdown": during["duration_s"].mean() / before["duration_s"].mean() - 1,
            "dst_interval_slowdown": during["interval_s"].median() / before["interval_s"].median() - 1,
        })
    return rows


def write_destination(stem: str, measured: pd.DataFrame, migrations: list[dict], steps: pd.DataFrame,
                      baseline_steps: int) -> None:
    """``STEM-destination.csv``: ``destination_rows`` of the measured migrations, with their prompt lengths."""
    rows = pd.DataFrame(destination_rows(migrations, steps, baseline_steps))
    rows.insert(1, "prompt_tokens", rows["client_request_id"].map(
        measured.set_index("client_request_id")["prompt_tokens"]))
    rows.to_csv(f"{stem}-destination.csv", index=False)
    print(rows.groupby("prompt_tokens")[["dst_batch", "dst_steps_during", "dst_decode_slowdown",
                                         "dst_interval_slowdown"]].median().to_string())


def reanalyze(stem: str, baseline_steps: int) -> None:
    """``STEM-destination.csv`` from a run's raw logs (``STEM-steps.csv``, ``STEM-migrations.csv``), for the
    migrations of ``STEM.csv`` (the warm-up's left out)."""
    measured = pd.read_csv(f"{stem}.csv")
    migrations = pd.read_csv(f"{stem}-migrations.csv")
    migrations = migrations[migrations["client_request_id"].isin(measured["client_request_id"])]
    write_destination(stem, measured, migrations.to_dict("records"), pd.read_csv(f"{stem}-steps.csv"),
                      baseline_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-transport", default="object-store", choices=["object-store", "gloo", "nccl"])
    parser.add_argument("--kv-chunk-blocks", type=int, default=None,
                        help="blocks per send (0: a stage in one send; default: the server's)")
    parser.add_argument("--kv-paced", action=argparse.BooleanOptionalAction, default=None,
                        help="a non-final stage sends at most one chunk per source step (default: the server's)")
    parser.add_argument("--lengths", default="512,2048", help="prompt tokens of the migrated request")
    parser.add_argument("--repeats", type=int, default=3, help="migrations per length")
    parser.add_argument("--background", type=int, default=8, help="other requests decoding (both instances)")
    parser.add_argument("--output-tokens", type=int, default=160)
    parser.add_argument("--migrate-after", type=int, default=64, help="tokens the request has when it is migrated")
    parser.add_argument("--baseline-steps", type=int, default=30)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: enough)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", help="output CSV (required unless --reanalyze)")
    parser.add_argument("--reanalyze", metavar="STEM",
                        help="run nothing: write STEM-destination.csv from a run's raw logs (STEM-steps.csv, ...)")
    args = parser.parse_args()
    if args.reanalyze:
        reanalyze(args.reanalyze.removesuffix(".csv"), args.baseline_steps)
        return
    if not args.output:
        parser.error("-o/--output is required (or --reanalyze STEM)")

    lengths = [int(x) for x in args.lengths.split(",")]
    rows_needed = args.background * (BACKGROUND_PROMPT + args.output_tokens + 32) + max(lengths) + args.output_tokens
    values = {"instances": 2, "port": 0, "policy": "infaas++", "device": args.device, "model": args.model,
              "dtype": args.dtype, "kv_transport": args.kv_transport, "kv_timeout_s": 60.0,
              "num_blocks": args.num_blocks or 2 * rows_needed // 16, "num_cpus_per_instance": 1}
    if args.kv_chunk_blocks is not None:
        values["kv_chunk_blocks"] = args.kv_chunk_blocks or None
    if args.kv_paced is not None:
        values["kv_paced"] = args.kv_paced
    config = build_serve_config({}, values)
    init_ray(None, log_to_driver=False)
    rng = np.random.default_rng(args.seed)
    with BackgroundServer(config, startup_timeout_s=600) as srv:
        info = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]
        # warm-up: the KV channels both ways (opening one takes seconds while the request decodes), the decode
        # graphs of the batch sizes to come
        warm = one_round(srv, rng.integers(0, 1000, 256).tolist(), 4 * args.output_tokens, args.background,
                         [8, 2 * args.output_tokens], 1)
        targets: dict[str, int] = {}
        for length in lengths:
            for r in range(args.repeats):
                prompt = rng.integers(0, 1000, length).tolist()
                rid = one_round(srv, prompt, args.output_tokens, args.background, [args.migrate_after], 100 + r)
                targets[rid] = length
                print(f"prompt {length}: migration {r + 1} of {args.repeats} done", flush=True)
        migrations = [m for m in migration_log(srv) if m["committed"] and m["client_request_id"] != warm]
        steps = pd.DataFrame(all_steps(srv.url, srv.admin_headers, sorted(srv.manager.instances)))
    steps["duration_s"] = steps["end_s"] - steps["start_s"]
    rows = pd.DataFrame(slowdown_rows(migrations, steps, args.baseline_steps))
    rows.insert(0, "prompt_tokens", rows["client_request_id"].map(targets))
    rows.insert(1, "seq_len_at_start", rows["prompt_tokens"] + args.migrate_after)
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    rows = rows.assign(
        device_name=device_name, model=args.model, dtype=args.dtype, transport=args.kv_transport,
        chunk_blocks=config.kv_chunk_blocks, paced=config.kv_paced, kv_bytes=rows["blocks"] * info["kv_bytes_per_block"],
        background=args.background, torch_version=torch.__version__, cuda_version=torch.version.cuda or "",
        host=platform.node(), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        notes=("llumnix serve (Ray instance actors, policy infaas++: no migration of its own), two instances"
               + (", one GPU each" if args.device == "cuda" else "") + f"; {args.background} background requests of "
               f"{BACKGROUND_PROMPT} prompt tokens decoding on both; the request migrated by POST /admin/migrate after "
               f"{args.migrate_after} tokens; decode_step_migrating_s: mean of the source's decode steps overlapping "
               "the non-final stages, decode_step_s: its last decode steps before the migration with the same batch; "
               "decode_step(_migrating)_median_s: their medians; decode_interval(_migrating)_s: the median of the same steps' start to the source's next step's (their "
               "duration and the gap after; median: the last step of the bulk stage is followed by the stop-and-copy)"
               "; downtime: freeze to commit on the source's clock"),
    )
    rows.to_csv(args.output, index=False)
    # the raw logs beside it, for what the summary leaves out (which steps were long, and when)
    stem = args.output.removesuffix(".csv")
    steps.to_csv(f"{stem}-steps.csv", index=False)
    pd.DataFrame(migrations).to_csv(f"{stem}-migrations.csv", index=False)
    write_destination(stem, rows, migrations, steps, args.baseline_steps)  # the destination's side
    print(rows.groupby("prompt_tokens")[["stages", "blocks", "downtime_s", "decode_step_s",
                                         "decode_step_migrating_s", "decode_slowdown", "interval_slowdown", "steps_during"]]
          .median().to_string())


if __name__ == "__main__":
    main()
