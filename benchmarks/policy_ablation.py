"""Which rule moves which number: the paper's claims under the artifact's rules, each rule switched back in turn.

Every run goes through the CLI (``llumnix trace``, ``llumnix simulate``) on the experiments' own traces (seed 0: the
artifact's trace of each setting, ``--stream artifact``) with the default ``a10-llama-7b`` profile
unless the row says otherwise; ``uncalibrated profile`` is the reconstruction before the Fig 11 calibration (commit
2f94485). Three settings, each a claim of the paper:

- Fig 13 (priorities): S-S, Gamma 26 req/s, CV 2 and 8, 10% high priority; Llumnix with priorities vs without. High
  priority: mean request latency and P99 prefill, without / with (paper 1.2-1.5x, up to 10x); normal: mean request
  latency, with / without - 1 (paper at most +4.5%). The variant's flags go to both runs.
- The same at CV 2 on another draw of the trace (``--stream seeded``, seed 0): how much of Fig 13 is one trace's luck.
- Fig 11 (the tail-latency claim): L-L at 3.0 req/s, INFaaS++ vs Llumnix, P99 prefill INFaaS++ / Llumnix (paper 14.8x).
- Fig 14 (auto-scaling): L-L Poisson 2.6 req/s, 8 instances at start, 1-16, INFaaS++ vs Llumnix with the same
  scaler: P99 prefill INFaaS++ / Llumnix (paper up to 12.2x) and the cost saving INFaaS++ / Llumnix instances - 1,
  time-weighted (paper 16%).

With ``--named``, only this project's named systems (``llumnix-sized``, ``llumnix-hysteresis``; not the paper's) against
``llumnix`` and INFaaS++, each a row: Fig 11 at L-L 3.0 req/s and at S-L 4.1 req/s with the artifact's migration
threshold 10 for that trace (where 3,000 requests showed migrations ping-ponging), and Fig 13 at CV 2 and 8 (each
system with priorities against itself without). Beside the claims' ratios: the system's own latencies, its committed
migrations, aborted attempts, "re-migrations" (migrations of a request that had migrated before) and "back"
migrations (a request returning to the instance it last left). Runs it shares with the ablation (INFaaS++, Llumnix's
default rules) have the same names, so one ``--work`` directory serves both.

Run: .venv/bin/python benchmarks/policy_ablation.py [--requests 10000] [--jobs 2] [--out benchmarks/policy_ablation.csv]
     .venv/bin/python benchmarks/policy_ablation.py --named [--out benchmarks/named_systems.csv]
Writes the CSV (one row per setting and variant, with the flags and the machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

LLUMNIX = [sys.executable, "-m", "llumnix.cli"]
UNCALIBRATED = "uncalibrated profile"

# (setting, variant) -> extra simulate flags (applied to both systems of the setting)
PRIORITY_VARIANTS = {
    "artifact rules (default)": [],
    "local queue: strict priority": ["--local-priority", "strict"],
    "local queue: no priority": ["--local-priority", "off"],
    "migration candidate: the artifact's last running": ["--candidate", "artifact"],
    "queued demand: head of line only (Algorithm 1)": ["--queued-demand", "head"],
    "high-priority headroom x2 (3,200 tokens usable)": ["--high-priority-kv-tokens", "3200"],
    UNCALIBRATED: [],
}
FIG11_VARIANTS = {
    "artifact rules (default)": [],
    "migration candidate: the artifact's last running": ["--candidate", "artifact"],
    "queued demand: head of line only (Algorithm 1)": ["--queued-demand", "head"],
    "preemption only when a block is needed": ["--preemption", "block_needed"],
    UNCALIBRATED: [],
}
SCALING = ["--autoscale", "--instances", "8", "--initial-instances", "8", "--scale-up", "10", "--scale-down", "60",
           "--min-instances", "1", "--max-instances", "16"]
FIG14_VARIANTS = {
    "artifact rules (default)": [],
    "scaling rule: mean of per-instance freeness, one start at a time": ["--scaling-rule", "mean-freeness"],
    "first scaling decision at 10 s (artifact: 110 s)": ["--scale-first-check", "10"],
    "drained instance re-dispatches its queue": ["--requeue-on-drain"],
    UNCALIBRATED: [],
}
DEFAULT = "artifact rules (default)"
NAMED_SYSTEMS = ("llumnix", "llumnix-sized", "llumnix-hysteresis")  # llumnix: the paper's, to compare against
NAMED_FIG11 = {"fig11 L-L 3.0": ("ll3", []), "fig11 S-L 4.1 threshold 10": ("sl41", ["--migration-threshold", "10"])}


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def summary(work: Path, trace: Path, name: str, flags: list[str], profile: str | None) -> dict:
    out = work / name
    if not (out / "summary.json").exists():
        run([*LLUMNIX, "simulate", "--trace", str(trace), "--out", str(out), "--no-progress",
             *(["--profile", profile] if profile else []), *flags])
    return json.loads((out / "summary.json").read_text())


def migration_counts(out: Path) -> dict:
    """Committed migrations of a run (its ``migrations.parquet``): how many moved a request that had migrated before,
    and how many took a request back to the instance it had last left (ping-pong)."""
    m = pd.read_parquet(out / "migrations.parquet")
    if m.empty:
        return {"remigrations": 0, "back_migrations": 0}
    m = m[m["committed"]].sort_values(["request_id", "start_s"])
    before = m.groupby("request_id")[["src", "dst"]].shift()
    return {"remigrations": int(before["src"].notna().sum()),
            "back_migrations": int(((m["dst"] == before["src"]) & (m["src"] == before["dst"])).sum())}


def job_name(setting: str, variant: str, tag: str) -> str:
    return f"{setting}-{variant}-{tag}".replace(" ", "_").replace("/", "_").replace(":", "").replace(",", "")


def fig13_tag(system: str, tag: str) -> str:
    """The run tag of ``system`` without ("base") / with ("prio") priorities; llumnix's are the ablation's own."""
    return tag if system == "llumnix" else f"{system} {tag}"


def priority_gains(base: dict, prio: dict) -> dict:
    """Fig 13's claims from the summaries without (``base``) and with priorities (``prio``)."""
    return {"high_e2e_mean_gain": base["high"]["e2e_mean_s"] / prio["high"]["e2e_mean_s"],
            "high_prefill_p99_gain": base["high"]["prefill_p99_s"] / prio["high"]["prefill_p99_s"],
            "normal_e2e_mean_increase": prio["normal"]["e2e_mean_s"] / base["normal"]["e2e_mean_s"] - 1}


def tail_gain(infaas: dict, system: dict) -> dict:
    """The tail-latency claim: INFaaS++'s P99 prefill over the system's."""
    return {"prefill_p99_gain": infaas["prefill_p99_s"] / system["prefill_p99_s"],
            "infaas_prefill_p99_s": infaas["prefill_p99_s"]}


def named_rows(work: Path, jobs: list, results: dict) -> list[dict]:
    """One row per (setting, named system or llumnix): the claim's ratio and the system's own numbers."""
    rows = []
    for setting, variant, tag in results:
        fig13 = setting.startswith("fig13")
        system = next((x for x in NAMED_SYSTEMS if tag == (fig13_tag(x, "prio") if fig13 else x)), None)
        if system is None:
            continue
        s = results[(setting, variant, tag)]
        flags = next(j[4] for j in jobs if j[:3] == (setting, variant, tag))
        row = {"setting": setting, "system": system, "flags": shlex.join(flags)}
        if fig13:
            row.update(priority_gains(results[(setting, variant, fig13_tag(system, "base"))], s),
                       high_prefill_p99_s=s["high"]["prefill_p99_s"], high_e2e_mean_s=s["high"]["e2e_mean_s"],
                       normal_e2e_mean_s=s["normal"]["e2e_mean_s"])
        else:
            row.update(tail_gain(results[(setting, DEFAULT, "infaas++")], s))
        row.update(prefill_p99_s=s["prefill_p99_s"], prefill_mean_s=s["prefill_mean_s"], e2e_mean_s=s["e2e_mean_s"],
                   e2e_p99_s=s["e2e_p99_s"], preemptions=s["preemptions"], migrations=s["migrations"],
                   migration_aborts=s["migration_aborts"],
                   **migration_counts(work / job_name(setting, variant, tag)))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=None, help="Directory for traces and runs (default: a temporary one).")
    ap.add_argument("--named", action="store_true",
                    help="Only the project's named systems against llumnix (see above); default --out "
                         "benchmarks/named_systems.csv.")
    ap.add_argument("--out", default=None, help="CSV to write (default: benchmarks/policy_ablation.csv, or "
                                                "benchmarks/named_systems.csv with --named).")
    args = ap.parse_args()
    args.out = args.out or f"benchmarks/{'named_systems' if args.named else 'policy_ablation'}.csv"
    work = Path(args.work or tempfile.mkdtemp(prefix="ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    old = work / "a10-llama-7b-uncalibrated.json"
    old.write_text(subprocess.run(["git", "show", "2f94485:llumnix/profiles/a10-llama-7b.json"], check=True,
                                  capture_output=True, text=True).stdout)
    n, seed = str(args.requests), str(args.seed)
    traces = {
        "cv2": ["--workload", "S-S", "--rate", "26", "--arrival", "gamma", "--cv", "2", "--priority-fraction", "0.1",
                "--stream", "artifact"],
        "cv8": ["--workload", "S-S", "--rate", "26", "--arrival", "gamma", "--cv", "8", "--priority-fraction", "0.1",
                "--stream", "artifact"],
        "cv2-seeded": ["--workload", "S-S", "--rate", "26", "--arrival", "gamma", "--cv", "2", "--priority-fraction",
                       "0.1", "--stream", "seeded"],
        "ll3": ["--workload", "L-L", "--rate", "3.0", "--stream", "artifact"],
        "ll26": ["--workload", "L-L", "--rate", "2.6", "--stream", "artifact"],
        "sl41": ["--workload", "S-L", "--rate", "4.1", "--stream", "artifact"],
    }

    jobs = []  # (setting, variant, system tag, trace, flags, profile)
    if args.named:
        for setting, (trace, flags) in NAMED_FIG11.items():
            for policy in ("infaas++", *NAMED_SYSTEMS):
                jobs.append((setting, DEFAULT, policy, trace, ["--policy", policy, *flags], None))
        for cv in ("cv2", "cv8"):
            for system in NAMED_SYSTEMS:
                for tag, sys_flags in (("base", ["--no-priorities"]), ("prio", ["--priorities"])):
                    jobs.append(("fig13 " + cv, DEFAULT, fig13_tag(system, tag), cv,
                                 ["--policy", system, *sys_flags], None))
    for variant, flags in PRIORITY_VARIANTS.items() if not args.named else ():
        prof = str(old) if variant == UNCALIBRATED else None
        for cv in ("cv2", "cv8"):
            for tag, sys_flags in (("base", ["--no-priorities"]), ("prio", ["--priorities"])):
                jobs.append(("fig13 " + cv, variant, tag, cv, ["--policy", "llumnix", *sys_flags, *flags], prof))
    for variant in ("artifact rules (default)", "migration candidate: the artifact's last running",
                    "high-priority headroom x2 (3,200 tokens usable)") if not args.named else ():  # another draw
        for tag, sys_flags in (("base", ["--no-priorities"]), ("prio", ["--priorities"])):
            jobs.append(("fig13 cv2-seeded", variant, tag, "cv2-seeded",
                         ["--policy", "llumnix", *sys_flags, *PRIORITY_VARIANTS[variant]], None))
    for variant, flags in FIG11_VARIANTS.items() if not args.named else ():
        prof = str(old) if variant == UNCALIBRATED else None
        for policy in ("infaas++", "llumnix"):
            jobs.append(("fig11 L-L 3.0", variant, policy, "ll3", ["--policy", policy, *flags], prof))
    for variant, flags in FIG14_VARIANTS.items() if not args.named else ():
        prof = str(old) if variant == UNCALIBRATED else None
        for policy in ("infaas++", "llumnix"):
            jobs.append(("fig14 L-L 2.6", variant, policy, "ll26", ["--policy", policy, *SCALING, *flags], prof))

    for name in sorted({j[3] for j in jobs}):
        if not (work / f"{name}.parquet").exists():
            run([*LLUMNIX, "trace", *traces[name], "--num-requests", n, "--seed", seed, "-o",
                 str(work / f"{name}.parquet")])

    def one(job):
        setting, variant, tag, trace, flags, prof = job
        return job, summary(work, work / f"{trace}.parquet", job_name(setting, variant, tag), flags, prof)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = {(j[0], j[1], j[2]): s for j, s in pool.map(one, jobs)}

    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    rows = named_rows(work, jobs, results) if args.named else []
    for (setting, variant, tag), s in results.items() if not args.named else ():
        if tag not in ("prio", "llumnix"):
            continue
        flags = next(j[4] for j in jobs if j[:3] == (setting, variant, tag))
        row = {"setting": setting, "variant": variant, "flags": shlex.join(flags)}
        if setting.startswith("fig13"):
            row.update(priority_gains(results[(setting, variant, "base")], s))
        else:
            inf = results[(setting, variant, "infaas++")]
            row.update(tail_gain(inf, s), llumnix_prefill_p99_s=s["prefill_p99_s"])
            if setting.startswith("fig14"):
                row.update(cost_saving=inf["avg_instances"] / s["avg_instances"] - 1,
                           infaas_instances=inf["avg_instances"], llumnix_instances=s["avg_instances"])
        rows.append(row)
    df = pd.DataFrame(rows).assign(requests=args.requests, seed=args.seed, machine=machine,
                                   date=datetime.date.today().isoformat())
    df.to_csv(args.out, index=False)
    print(df.drop(columns=["flags", "machine", "date"]).dropna(axis=1, how="all")
          .to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
