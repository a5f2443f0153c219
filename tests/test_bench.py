"""The Fig 10 migration benchmark and the step-time profiler on the tiny model (CPU); the CUDA paths are run on a GPU
machine (results/fig10/README.md) and skipped here with a reason."""

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from llumnix.bench.cli import COMMANDS
from llumnix.bench.migration import MigrationBenchConfig, measurements_table, run_migration_bench
from llumnix.bench.profiler import ProfileConfig, decode_grid, measure_profile, prefill_grid
from llumnix.core.migration_protocol import Copy
from llumnix.core.request import Request
from llumnix.engine.executor import TorchExecutor
from llumnix.engine.kv_cache import KVCachePool
from llumnix.engine.kv_transfer import ExecutorTransfer, KVTransfer, PendingCopy, PoolTransfer, block_runs
from llumnix.profiles import Profile
from llumnix.runtime.instance import EngineInstance, migrate_in_process
from llumnix.sim import SimConfig, simulate

TIME_COLUMNS = ["recompute_s", "blocking_copy_s", "downtime_s", "decode_step_s", "decode_step_migrating_s"]
SMALL_GRID = dict(prefill_lengths=(32, 128), prefill_batches=(1, 4), decode_batches=(1, 8), decode_contexts=(64, 512),
                  copy_blocks=(1, 8, 32), repeats=1, warmup=0)


def cli(*args):
    from llumnix.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def bench_df():
    return run_migration_bench(MigrationBenchConfig(lengths=(48, 96, 200), repeats=2, warmup=0))


def test_migration_bench_rows_token_identical_with_positive_times(bench_df):
    assert list(bench_df["seq_len"]) == [48, 96, 200]
    assert bench_df["token_identical"].all() and bench_df["reference_stable"].all()
    assert bench_df["kv_identical"].all() and bench_df["token_identical_timed"].all()
    assert (bench_df["migrations"] == bench_df["migrations_asked"]).all() and (bench_df["aborted"] == "").all()
    assert (bench_df["migrations"] == 2).all()  # one per repeat
    assert (bench_df[TIME_COLUMNS] > 0).all().all()
    assert (bench_df["stages"] >= 2).all()  # a bulk stage while decoding, then the stop-and-copy
    assert (bench_df["kv_tokens"] < bench_df["seq_len"]).all()
    for col in ("device_name", "model", "dtype", "torch_version", "notes"):
        assert bench_df[col].astype(bool).all()
    assert "sequentially" in bench_df["notes"].iloc[0]  # CPU: no copy/decode overlap, and the CSV says so
    # Recompute grows with length; live migration's stop-and-copy stays a couple of blocks.
    assert bench_df["recompute_s"].iloc[-1] > bench_df["recompute_s"].iloc[0]
    assert (bench_df["migrated_blocks"] >= bench_df["kv_tokens"] // 16).all()


def test_migration_bench_with_background_batch_there_and_back():
    cfg = MigrationBenchConfig(lengths=(80,), batch=3, repeats=1, warmup=0, steps_per_stage=2, migrations=3,
                               output_tokens=24)
    df = run_migration_bench(cfg)
    assert df["token_identical"].all() and df["token_identical_timed"].all()
    assert df["batch"].iloc[0] == 3 and df["migrations"].iloc[0] == 3


def test_migration_token_identical_under_deterministic_kernels():
    """The CUDA identity check's mode (deterministic algorithms) runs the same code; here on CPU."""
    import llumnix.bench.migration as m

    cfg = MigrationBenchConfig(lengths=(64,), repeats=1, warmup=0, migrations=2, output_tokens=16)
    executors = [TorchExecutor("tiny", cfg.pool_blocks) for _ in range(2)]
    pools = [e.runner.kv_cache for e in executors]
    bench = m._Bench(cfg, *(EngineInstance(i, e) for i, e in enumerate(executors)),
                     {"device": (PoolTransfer(pools[0], {1: pools[1]}), PoolTransfer(pools[1], {0: pools[0]}))}, 1024)
    with m.deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled()
        ref = bench.reference(64)
        run = bench.migration(64, "device", verify_kv=True)
    assert not torch.are_deterministic_algorithms_enabled()
    assert run.committed and len(run.downtimes_s) == 2 and run.tokens == ref.tokens and run.kv_identical


class SlowTransfer(KVTransfer):
    """A copy lands only at every ``polls``-th poll: a transfer slower than the source's steps (as NCCL limited to
    one CTA was across two H200s), reproduced on CPU."""

    def __init__(self, inner: KVTransfer, polls: int) -> None:
        self.inner, self.polls = inner, polls

    def start(self, copy):
        pending, polled = self.inner.start(copy), [0]

        def poll() -> bool:
            polled[0] += 1
            return polled[0] % self.polls == 0 and pending.done()

        return PendingCopy(pending.num_bytes, poll, pending.drain if hasattr(pending, "drain") else None)

    def synchronize(self) -> None:
        self.inner.synchronize()


def test_a_migration_the_request_outlasts_is_reported_not_taken_for_a_wrong_output():
    """Copies 3x slower than the output tokens allow: the third of four migrations aborts as the request finishes.
    The row says so (committed of asked, why, the fix), and identity is judged on what did commit: the output is the
    unmigrated one and the committed migrations' KV was bit-equal."""
    import llumnix.bench.migration as m

    cfg = MigrationBenchConfig(lengths=(200,), repeats=1, warmup=0, migrations=4, chunk_blocks=2)
    executors = [TorchExecutor("tiny", cfg.pool_blocks) for _ in range(2)]
    pools = [e.runner.kv_cache for e in executors]
    slow = tuple(SlowTransfer(PoolTransfer(pools[i], {1 - i: pools[1 - i]}, chunk_blocks=2), 3) for i in (0, 1))
    bench = m._Bench(cfg, *(EngineInstance(i, e) for i, e in enumerate(executors)), {"device": slow}, 1024)
    row = m._measure(cfg, bench, "cpu", 1, None).iloc[0]
    assert row["migrations"] == 2 and row["migrations_asked"] == 4
    assert "migration 3 of 4 aborted" in row["aborted"] and "raise --output-tokens above" in row["aborted"]
    assert row["token_identical"] and row["kv_identical"] and row["token_identical_timed"]


def test_determinism_probe_on_cpu(tmp_path):
    """`llumnix bench determinism`: alone runs repeat bit for bit in other KV blocks; batch-invariant decoding keeps a
    sequence's logits bit-equal beside other sequences."""
    import pandas as pd

    out = tmp_path / "det.csv"
    cli("bench", "determinism", "--lengths", "40,90", "--batches", "1,3,5", "--output-tokens", "6", "--repeats", "2",
        "--modes", "eager+gather,eager+gather+invariant", "-o", out)
    df = pd.read_csv(out)
    assert len(df) == 2 * 2 * 3 and set(df["mode"]) == {"eager+gather", "eager+gather+invariant"}
    alone = df[df["batch"] == 1]
    assert alone["tokens_stable"].all() and alone["logits_identical"].all() and (alone["max_logit_diff"] == 0).all()
    invariant = df[df["mode"] == "eager+gather+invariant"]
    assert invariant["logits_identical"].all() and invariant["tokens_match_alone"].all()
    assert (df["min_top2_gap"] > 0).all() and df["device_name"].astype(bool).all()
    from llumnix.cli import main

    bad = CliRunner().invoke(main, ["bench", "determinism", "--modes", "warp-speed", "-o", str(out)])
    assert bad.exit_code != 0 and "unknown mode" in bad.output


def test_measurements_table_long_format(bench_df):
    long = measurements_table(bench_df)
    assert set(long["method"]) == {"recompute", "blocking-copy", "llumnix"}
    assert len(long) == 3 * len(bench_df)
    assert long.loc[long["method"] == "llumnix", "decode_slowdown"].notna().all()
    # a cross-process run alone (no device row) still has its recompute bars, once per length
    nccl = measurements_table(bench_df.assign(transport="nccl"))
    assert set(nccl["method"]) == {"recompute", "blocking-copy (nccl)", "llumnix (nccl)"} and len(nccl) == len(long)


def test_bench_config_rejects_bad_input():
    with pytest.raises(ValueError, match="exceed --output-tokens"):
        MigrationBenchConfig(lengths=(8,))
    with pytest.raises(ValueError, match="too small"):
        MigrationBenchConfig(lengths=(1024,), num_blocks=10, output_tokens=20)
    with pytest.raises(ValueError, match="must be at least 12"):  # 64 blocks, 16 a step: a stage spans 5 steps
        MigrationBenchConfig(lengths=(1024,), output_tokens=8)
    assert MigrationBenchConfig(lengths=(1024,)).output_tokens == 12  # the default: as many as the stages need
    assert MigrationBenchConfig(lengths=(256,)).output_tokens == 8
    assert MigrationBenchConfig(lengths=(1024,), chunk_blocks=None).min_output_tokens == 8
    with pytest.raises(ValueError, match="--chunk-blocks must be >= 1"):
        MigrationBenchConfig(chunk_blocks=0)
    with pytest.raises(ValueError, match="needs --device cuda"):
        MigrationBenchConfig(transports=("host",))
    with pytest.raises(ValueError, match="must be at least"):
        MigrationBenchConfig(migrations=4, output_tokens=8)
    with pytest.raises(ValueError, match="run it alone"):
        MigrationBenchConfig(transports=("device", "gloo"))
    with pytest.raises(ValueError, match="nccl transport sends CUDA tensors"):
        MigrationBenchConfig(transports=("nccl",))


def test_migration_bench_across_two_processes_over_gloo(tmp_path):
    """The destination's model and KV pool in a child process, every stage's KV over a gloo channel."""
    csv = tmp_path / "gloo.csv"
    cli("bench", "migration", "--transport", "gloo", "--lengths", "80,128", "--repeats", "1", "--warmup", "0",
        "--migrations", "2", "--output-tokens", "24", "--chunk-blocks", "2", "-o", csv)  # stages paced 2 blocks a step
    df = pd.read_csv(csv)
    assert list(df["transport"]) == ["gloo", "gloo"] and (df["migrations"] == 2).all()
    assert df["token_identical"].all() and df["kv_identical"].all() and df["token_identical_timed"].all()
    assert (df[TIME_COLUMNS] > 0).all().all() and (df["stages"] >= 2).all()
    assert df["device_name"].str.contains("another process").all()
    assert df["notes"].str.contains("child process").all() and df["notes"].str.contains("gloo channel").all()
    # the way back (the child the source) against the child's own unmigrated steps
    assert (df[["decode_step_back_s", "decode_step_migrating_back_s"]] > 0).all().all()
    assert df["decode_slowdown_back"].notna().all() and df["notes"].str.contains("way back").all()


def test_kv_transfer_copies_blocks_exactly():
    kw = dict(num_kv_heads=2, head_dim=8)
    src, dst = KVCachePool(2, 10, 4, **kw), KVCachePool(2, 6, 4, **kw)
    src.cache.normal_()
    transfer = PoolTransfer(src, {1: dst})
    pending = transfer.start(Copy(0, 1, 0, (7, 2, 5), (0, 4, 1), False))
    assert pending.done() and pending.num_bytes == 3 * src.bytes_per_block
    torch.testing.assert_close(dst.read_blocks([0, 4, 1]), src.read_blocks([7, 2, 5]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="destination blocks"):
        transfer.start(Copy(0, 1, 0, (1, 2), (3,), False))


def test_block_runs_coalesce_ids_that_advance_together():
    assert block_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 4, 7]) == [(4, 0, 3), (9, 3, 2), (2, 7, 1)]
    assert block_runs([], []) == []


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_a_non_final_stage_is_copied_a_chunk_per_poll_and_the_final_one_at_once(device):
    kw = dict(num_kv_heads=2, head_dim=8, device=device)
    src, dst = KVCachePool(2, 12, 4, **kw), KVCachePool(2, 12, 4, **kw)
    src.cache.normal_()
    transfer = PoolTransfer(src, {1: dst}, chunk_blocks=2)
    blocks = (3, 4, 5, 9, 1)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def landed(n):  # the first n blocks of the stage are on the destination, the others still zero
        sync()
        got = dst.read_blocks(list(range(5)))
        assert got[:, :, :n].equal(src.read_blocks(list(blocks[:n])))
        assert not got[:, :, n:].any()

    pending = transfer.start(Copy(0, 1, 0, blocks, (0, 1, 2, 3, 4), False))
    landed(2)
    polls = []
    for _ in range(3):  # each poll after the chunk in flight landed issues the next one
        sync()
        polls.append(pending.done())
    assert polls == [False, False, True]
    landed(5)
    dst.cache.zero_()
    final = transfer.start(Copy(0, 1, 1, blocks, (0, 1, 2, 3, 4), True))  # stop-and-copy: whole
    landed(5)
    assert final.done()
    dst.cache.zero_()
    transfer.start(Copy(0, 1, 0, blocks, (0, 1, 2, 3, 4), False))
    transfer.synchronize()  # drains what is left at once
    landed(5)


def test_a_paced_bulk_stage_spans_source_steps_and_keeps_the_tokens():
    src, dst, ref_inst = (EngineInstance(i, TorchExecutor("tiny", 64)) for i in range(3))
    prompt = list(range(100, 196))  # 6 blocks of 16
    ref = Request(1, 0.0, len(prompt), 30, prompt_token_ids=list(prompt))
    ref_inst.add_request(ref)
    ref_inst.run_until_idle()
    req = Request(2, 0.0, len(prompt), 30, prompt_token_ids=list(prompt))
    src.add_request(req)
    src.step()
    transfer = PoolTransfer(src.executor.runner.kv_cache, {1: dst.executor.runner.kv_cache}, chunk_blocks=1)
    before = len(src.steps)
    mig = migrate_in_process(1, req, src, dst, transfer=transfer)
    assert mig.committed and len(mig.stages[0].src_blocks) == 6
    assert len(src.steps) - before >= 6  # a block per source step
    dst.run_until_idle()
    assert req.output_token_ids == ref.output_token_ids


def test_migrate_in_process_keeps_stepping_until_an_async_copy_lands():
    """A transfer whose copy lands late: the source keeps decoding meanwhile, and the output is still exact."""
    src, dst = (EngineInstance(i, TorchExecutor("tiny", 64)) for i in range(2))
    ref_inst = EngineInstance(2, TorchExecutor("tiny", 64))
    prompt = list(range(100, 160))
    ref = Request(1, 0.0, 60, 30, prompt_token_ids=list(prompt))
    ref_inst.add_request(ref)
    ref_inst.run_until_idle()

    req = Request(2, 0.0, 60, 30, prompt_token_ids=list(prompt))
    src.add_request(req)
    for _ in range(3):
        src.step()
    polls = {"left": 0}

    class LateTransfer(ExecutorTransfer):
        def start(self, copy):
            landed = super().start(copy)
            polls["left"] = 0 if copy.final else 4

            def done():
                polls["left"] -= 1
                return polls["left"] < 0

            return PendingCopy(landed.num_bytes, done)

    late_transfer = LateTransfer(src.executor, {1: dst.executor})

    before = len(src.steps)
    mig = migrate_in_process(1, req, src, dst, transfer=late_transfer)
    assert mig.stages[-1].final and len(src.steps) - before >= 4
    dst.run_until_idle()
    assert req.output_token_ids == ref.output_token_ids


def test_kv_check_catches_a_corrupted_copy():
    import llumnix.bench.migration as m

    class Corrupting(PoolTransfer):
        def start(self, copy):
            pending = super().start(copy)
            if copy.dst_blocks:
                self.destinations[copy.dst].cache[:, :, copy.dst_blocks[0], 0] += 1.0
            return pending

    cfg = MigrationBenchConfig(lengths=(64,), repeats=1, warmup=0)
    executors = [TorchExecutor("tiny", cfg.pool_blocks) for _ in range(2)]
    pools = [e.runner.kv_cache for e in executors]
    bench = m._Bench(cfg, *(EngineInstance(i, e) for i, e in enumerate(executors)),
                     {"device": (Corrupting(pools[0], {1: pools[1]}), PoolTransfer(pools[1], {0: pools[0]}))}, 1024)
    assert bench.migration(64, "device", verify_kv=True).kv_identical is False


def test_profile_grids_fit_the_pool():
    cfg = ProfileConfig(num_blocks=100, max_batched_tokens=1000)
    for b, n in prefill_grid(cfg, max_position=8192):
        assert b * n <= 1000 and b * -(-n // 16) <= 100
    points = decode_grid(cfg, max_position=8192)
    assert {b for b, _ in points} == {b for b in (1, 2, 4, 8, 16, 32, 64)}
    for b, total in points:
        assert b <= total <= 100 * 16


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    cfg = ProfileConfig(name="test-tiny", num_blocks=128, **SMALL_GRID)
    path = measure_profile(cfg, command="pytest").save(tmp_path_factory.mktemp("prof") / "test-tiny.json")
    return path


def test_profiler_writes_a_loadable_measured_profile(tiny_profile):
    prof = Profile.load(tiny_profile)
    assert prof.reconstructed is False and prof.provenance.startswith("measured: pytest, ")
    assert prof.total_blocks == 128 and prof.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
    assert len(prof.prefill) >= 3 and len(prof.decode) >= 4 and len(prof.blocking_copy) == 3
    assert prof.migration_bandwidth_bytes_per_s > 0 and prof.step_overhead_s > 0
    assert prof.prefill_time_s([128]) > 0 and prof.decode_time_s(8, 512) > 0


def test_simulator_runs_on_a_measured_profile(tiny_profile):
    prof = Profile.load(tiny_profile)
    reqs = [Request(i, 0.01 * i, 20 + 7 * i, 5 + i % 4) for i in range(12)]
    res = simulate(reqs, prof, SimConfig(num_instances=2))
    assert len(res.requests) == 12 and all(r.finished for r in res.requests)


def test_packaged_cpu_tiny_profile_is_measured():
    prof = Profile.load("cpu-tiny")
    assert prof.reconstructed is False and prof.provenance.startswith("measured: llumnix profile")
    assert prof.total_blocks == 792


def test_prefill_flops_count_every_linear_layer_attention_and_the_head():
    from llumnix.bench.profiler import prefill_flops
    from llumnix.engine.model import get_model_config

    mc = get_model_config("llama-7b")
    h = mc.hidden_size
    linear = mc.num_params - 2 * mc.vocab_size * h - h - mc.num_layers * 2 * h  # less embeddings, head, norms
    head = 2 * h * mc.vocab_size
    assert prefill_flops(mc, 1000) == 2 * linear * 1000 + 2 * mc.num_layers * 1000**2 * h + head
    assert 13.0e12 < prefill_flops(mc, 1000) < 14.5e12  # ~2 x 6.5B params x 1000 tokens, plus attention


def test_prefill_floor_on_cpu(tmp_path, monkeypatch):
    from llumnix.bench import profiler

    monkeypatch.setattr(profiler, "measure_matmul_rate", lambda device, dtype: 1e10)  # skip the 8k x 8k product
    out = tmp_path / "prefill.csv"
    cli("bench", "prefill-floor", "--device", "cpu", "--model", "tiny", "--dtype", "float32", "--lengths", "16,64",
        "--repeats", "1", "-o", out)
    df = pd.read_csv(out)
    assert list(df["tokens"]) == [16, 64] and (df["prefill_s"] > 0).all()
    assert df["floor_s"].tolist() == pytest.approx((df["flops"] / 1e10).tolist())
    assert df["prefill_over_floor"].tolist() == pytest.approx((df["prefill_s"] / df["floor_s"]).tolist())
    assert df["command"].iloc[0].startswith("llumnix bench prefill-floor")


def test_decode_floor_grid_on_cpu(tmp_path, monkeypatch):
    """`llumnix bench decode-floor` over batches x contexts in one process: one CSV row per cell, the step time over
    the floor of its bytes; a grid needs a CSV output."""
    from llumnix.bench import profiler
    from llumnix.cli import main

    monkeypatch.setattr(profiler, "measure_copy_bandwidth", lambda device: 1e10)  # skip the 1 GiB copy
    out = tmp_path / "grid.csv"
    cli("bench", "decode-floor", "--device", "cpu", "--model", "tiny", "--dtype", "float32", "--batch", "1,3",
        "--context", "8,40", "--repeats", "1", "-o", out)
    df = pd.read_csv(out)
    assert list(zip(df["batch"], df["context_tokens_per_seq"], strict=True)) == [(1, 8), (1, 40), (3, 8), (3, 40)]
    assert df["fits"].all() and (df["decode_step_s"] > 0).all() and not df["paged_kernel"].any()
    assert (df["step_over_floor"] - df["decode_step_s"] / df["floor_s"]).abs().max() < 1e-12
    assert (df["kv_bytes"] == df["batch"] * df["context_tokens_per_seq"] * 2 * 4 * 2 * 64 * 4).all()
    assert df["command"].iloc[0].startswith("llumnix bench decode-floor --device cpu --model tiny")
    bad = CliRunner().invoke(main, ["bench", "decode-floor", "--device", "cpu", "--batch", "1,2", "-o",
                                    str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "*.csv" in bad.output

def test_cli_bench_profile_and_plot(tmp_path):
    assert {c.name for c in COMMANDS} >= {"bench", "profile", "plot-migration"}
    csv = tmp_path / "fig10.csv"
    cli("bench", "migration", "--lengths", "48,96", "--repeats", "1", "--warmup", "0", "-o", csv)
    df = pd.read_csv(csv)
    assert len(df) == 2 and df["token_identical"].all()
    cli("plot-migration", "--csv", csv, "-o", tmp_path / "fig10", "--measurements", tmp_path / "long.csv")
    assert (tmp_path / "fig10.png").stat().st_size > 0 and (tmp_path / "fig10.pdf").stat().st_size > 0
    assert set(pd.read_csv(tmp_path / "long.csv")["method"]) == {"recompute", "blocking-copy", "llumnix"}

    out = tmp_path / "p.json"
    cli("profile", "--num-blocks", "64", "--prefill-lengths", "32,64", "--prefill-batches", "1,2",
        "--decode-batches", "1,4", "--decode-contexts", "64", "--copy-blocks", "1,4", "--repeats", "1", "-o", out)
    data = json.loads(out.read_text())
    assert data["name"] == "p" and data["provenance"].startswith("measured: llumnix profile --device cpu")
    assert Profile.load(out).total_blocks == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_cuda_side_stream_transfers_token_identical():
    df = run_migration_bench(MigrationBenchConfig(device="cuda", lengths=(64, 256), repeats=1, output_tokens=12,
                                                  transports=("device", "host"), chunk_blocks=4))
    assert df["token_identical"].all() and df["kv_identical"].all() and (df["migrations"] == 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (NCCL puts one rank on each; run on the GPU machine)")
def test_cuda_nccl_across_two_gpus_token_identical():
    df = run_migration_bench(MigrationBenchConfig(device="cuda", lengths=(64, 256), repeats=1, migrations=2,
                                                  output_tokens=16, transports=("nccl",)))
    assert df["kv_identical"].all() and df["token_identical"].all()
    assert (df["dst_device"] == "cuda:1").all()
