"""Workload module: Table-1 length statistics, arrival processes, dataset loaders and trace I/O.

Length tests draw 200k samples with a fixed seed; the tolerances leave room for the sampling noise of a heavy-tailed
P99 (about +-2% at 200k samples), so another seed would pass too.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from llumnix.workload import (
    LENGTH_CAP_TOKENS,
    LONG,
    MAX_TOTAL_TOKENS,
    MEDIUM,
    SHORT,
    TABLE1,
    TRACE_COLUMNS,
    WORKLOADS,
    TraceError,
    approx_token_count,
    burstgpt,
    fit_box_cox_lambda,
    fit_power_law,
    gamma_arrivals,
    high_priority_mask,
    load_burstgpt,
    load_sharegpt,
    make_trace,
    poisson_arrivals,
    read_trace,
    sample_pairs,
    sharegpt,
    write_trace,
)
from llumnix.workload import lengths as L

N_SAMPLES = 200_000
QUANTILES = np.array(L.TABLE1_QUANTILES)


def relative_errors(samples: np.ndarray, name: str) -> tuple[float, np.ndarray]:
    """(mean error, [P50, P80, P95, P99] errors) of samples against Table 1, as signed fractions."""
    target = TABLE1[name]
    mean_err = samples.mean() / target.mean_tokens - 1
    pct_err = np.quantile(samples, QUANTILES) / target.percentiles_tokens - 1
    return float(mean_err), pct_err


# -- ShareGPT / BurstGPT stand-ins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, generator", [("sharegpt", sharegpt), ("burstgpt", burstgpt)])
def test_dataset_generators_match_table1_within_10_percent(name, generator):
    # Achieved at seed 0 (mean; P50 / P80 / P95 / P99): sharegpt in -0.7%; -2.7 -1.4 -0.5 +0.9%, out +0.2%;
    # +0.0 +0.3 +0.4 +2.6%; burstgpt in -0.3%; -0.9 -0.5 -0.1 +1.1%, out +0.3%; +0.0 +0.5 +0.6 +2.3%. The
    # percentiles are knots of the quantile function, so only sampling and integer rounding move them.
    pairs = generator(N_SAMPLES, np.random.default_rng(0))
    for side, samples in (("input", pairs.prompt_tokens), ("output", pairs.output_tokens)):
        mean_err, pct_err = relative_errors(samples, f"{name}_{side}")
        assert abs(mean_err) < 0.10, (side, mean_err)
        assert np.all(np.abs(pct_err) < 0.10), (side, pct_err)
    assert pairs.prompt_tokens.min() >= 1 and pairs.output_tokens.min() >= 1
    assert (pairs.prompt_tokens + pairs.output_tokens).max() <= MAX_TOTAL_TOKENS


@pytest.mark.parametrize(
    "dist, name",
    [(L.SHAREGPT_INPUT, "sharegpt_input"), (L.SHAREGPT_OUTPUT, "sharegpt_output"),
     (L.BURSTGPT_INPUT, "burstgpt_input"), (L.BURSTGPT_OUTPUT, "burstgpt_output")],
)
def test_quantile_lengths_exact_mean_and_knots(dist, name):
    target = TABLE1[name]
    assert dist.mean_tokens() == pytest.approx(target.mean_tokens, rel=1e-4)
    np.testing.assert_allclose(dist.quantile_tokens(QUANTILES), target.percentiles_tokens, rtol=1e-9)
    # the stored lambda is what the bisection finds
    assert fit_box_cox_lambda(dist.knot_quantiles, dist.knot_tokens, target.mean_tokens) == pytest.approx(
        dist.box_cox_lambda, abs=1e-4
    )


def test_dataset_maxima_fit_one_instance():
    assert L.SHAREGPT_INPUT.max_tokens + L.SHAREGPT_OUTPUT.max_tokens <= MAX_TOTAL_TOKENS
    assert L.BURSTGPT_INPUT.max_tokens + L.BURSTGPT_OUTPUT.max_tokens <= MAX_TOTAL_TOKENS
    assert 2 * LENGTH_CAP_TOKENS <= MAX_TOTAL_TOKENS  # S-L / L-S at the caps


# -- Short / Medium / Long power laws ------------------------------------------------------------------------------

# Percentile tolerance per distribution = the fitted model's worst error (continuous quantiles, in lengths.py) plus
# ~3% for sampling noise and integer rounding. Short's 12% is above 10% on purpose: the best fit of this family
# (bounded power law + Zipf-Mandelbrot offset, mean held exact) is +8.0% at P50, P80 and P99 and +3.8% at P95, and
# sampling adds up to ~2% at P99, so 10% would be flaky across seeds. Medium's model is +3.7% everywhere, Long's
# +0.1%. Achieved at seed 1 (mean; P50 / P80 / P95 / P99): short -0.4%; +7.9 +8.0 +2.7 +6.4%, medium -0.5%;
# +3.1 +3.5 +2.2 +2.9%, long -0.3%; +0.0 +0.2 -0.7 -0.2%.
POWER_LAW_TOLERANCE = {"short": 0.12, "medium": 0.07, "long": 0.04}
POWER_LAW_MODEL_ERROR = {"short": 0.081, "medium": 0.037, "long": 0.002}


@pytest.mark.parametrize("dist, name", [(SHORT, "short"), (MEDIUM, "medium"), (LONG, "long")])
def test_power_law_samples_match_table1(dist, name):
    samples = dist.sample(N_SAMPLES, np.random.default_rng(1))
    mean_err, pct_err = relative_errors(samples, name)
    assert abs(mean_err) < 0.05
    assert np.all(np.abs(pct_err) < POWER_LAW_TOLERANCE[name]), pct_err
    assert samples.min() >= 1 and samples.max() <= LENGTH_CAP_TOKENS


@pytest.mark.parametrize("dist, name", [(SHORT, "short"), (MEDIUM, "medium"), (LONG, "long")])
def test_power_law_model_is_rescaled_to_the_mean(dist, name):
    assert dist.mean_tokens() == pytest.approx(TABLE1[name].mean_tokens, rel=1e-9)
    rel = dist.quantile_tokens(QUANTILES) / TABLE1[name].percentiles_tokens - 1
    assert np.abs(rel).max() < POWER_LAW_MODEL_ERROR[name], rel


@pytest.mark.parametrize("dist, name", [(SHORT, "short"), (MEDIUM, "medium"), (LONG, "long")])
def test_fit_power_law_reproduces_stored_constants(dist, name):
    """One short Nelder-Mead run from a generic start lands as close to Table 1 as the stored fit."""
    refit = fit_power_law(TABLE1[name], starts=((1.5, 7.0, 0.0),), iters=300)
    stored = L.percentile_log_errors(dist, TABLE1[name]).max()
    assert L.percentile_log_errors(refit, TABLE1[name]).max() < stored + 0.01
    assert refit.mean_tokens() == pytest.approx(TABLE1[name].mean_tokens, rel=1e-6)


# -- arrivals ------------------------------------------------------------------------------------------------------


def test_poisson_mean_rate():
    t = poisson_arrivals(4.0, N_SAMPLES, np.random.default_rng(2))
    assert np.all(np.diff(t) >= 0) and 0 < t[0] < 5.0
    assert N_SAMPLES / t[-1] == pytest.approx(4.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_mean_rate_and_cv(cv):
    t = gamma_arrivals(2.5, cv, N_SAMPLES, np.random.default_rng(3))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert N_SAMPLES / t[-1] == pytest.approx(2.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.10)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_arrivals_reject_bad_rate(bad):
    with pytest.raises(ValueError, match="--rate must be > 0"):
        poisson_arrivals(bad, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="--rate must be > 0"):
        gamma_arrivals(bad, 1.0, 10, np.random.default_rng(0))


# -- traces: generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", WORKLOADS)
def test_make_trace_schema(workload):
    df = make_trace(workload, rate=2.0, num_requests=500, seed=7, priority_fraction=0.2)
    assert tuple(df.columns) == TRACE_COLUMNS
    assert df["request_id"].tolist() == list(range(500))
    assert df["arrival_s"].is_monotonic_increasing
    assert (df["prompt_tokens"] >= 1).all() and (df["output_tokens"] >= 1).all()
    assert (df["prompt_tokens"] + df["output_tokens"]).max() <= MAX_TOTAL_TOKENS
    assert df["priority"].sum() == 100 and set(df["priority"].unique()) <= {0, 1}
    assert [str(t) for t in df.dtypes] == ["int64", "float64", "int64", "int64", "int64"]


def test_generated_workload_letters_pick_input_and_output_distributions():
    n = 20_000
    s_l = make_trace("S-L", 1.0, n, seed=0)
    l_s = make_trace("L-S", 1.0, n, seed=0)
    assert s_l["prompt_tokens"].mean() == pytest.approx(128, rel=0.1)
    assert s_l["output_tokens"].mean() == pytest.approx(512, rel=0.1)
    assert l_s["prompt_tokens"].mean() == pytest.approx(512, rel=0.1)
    assert l_s["output_tokens"].mean() == pytest.approx(128, rel=0.1)


def test_same_seed_same_trace_different_seed_differs():
    a = make_trace("sharegpt", 3.0, 1000, seed=11, arrival="gamma", cv=2.0, priority_fraction=0.1)
    b = make_trace("sharegpt", 3.0, 1000, seed=11, arrival="gamma", cv=2.0, priority_fraction=0.1)
    c = make_trace("sharegpt", 3.0, 1000, seed=12, arrival="gamma", cv=2.0, priority_fraction=0.1)
    pd.testing.assert_frame_equal(a, b)
    for column in ("arrival_s", "prompt_tokens", "output_tokens", "priority"):
        assert not a[column].equals(c[column]), column


def test_rate_and_priority_do_not_change_lengths():
    """Independent child streams: a rate sweep replays the same requests, only faster."""
    slow = make_trace("M-M", 1.0, 1000, seed=5)
    fast = make_trace("M-M", 4.0, 1000, seed=5, priority_fraction=0.5)
    pd.testing.assert_frame_equal(slow[["prompt_tokens", "output_tokens"]], fast[["prompt_tokens", "output_tokens"]])
    np.testing.assert_allclose(fast["arrival_s"] * 4.0, slow["arrival_s"])


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.1, 100), (0.333, 333), (1.0, 1000)])
def test_high_priority_fraction_is_exact(fraction, expected):
    priority = high_priority_mask(1000, fraction, np.random.default_rng(0))
    assert priority.sum() == expected and priority.dtype == np.int64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workload": "XL"}, "--workload must be one of S-S, M-M, L-L, S-L, L-S, sharegpt, burstgpt, got 'XL'"),
        ({"rate": -1}, "--rate must be > 0 (requests per second), got -1"),
        ({"rate": 0.0}, "--rate must be > 0"),
        ({"rate": float("nan")}, "--rate must be > 0"),
        ({"num_requests": 0}, "--num-requests must be an integer >= 1, got 0"),
        ({"num_requests": 2.5}, "--num-requests must be an integer >= 1"),
        ({"seed": -3}, "--seed must be an integer >= 0, got -3"),
        ({"arrival": "uniform"}, "--arrival must be one of poisson, gamma, got 'uniform'"),
        ({"cv": 0.0}, "--cv must be > 0"),
        ({"cv": -2.0}, "--cv must be > 0"),
        ({"priority_fraction": 1.5}, "--priority-fraction must be within [0, 1], got 1.5"),
        ({"priority_fraction": -0.1}, "--priority-fraction must be within [0, 1]"),
        ({"dataset_path": "x.json"}, "--dataset applies only to sharegpt and burstgpt"),
    ],
)
def test_make_trace_rejects_bad_arguments(kwargs, message):
    args = {"workload": "S-S", "rate": 1.0, "num_requests": 10, "seed": 0} | kwargs
    with pytest.raises(ValueError) as info:
        make_trace(**args)
    assert message in str(info.value)


# -- dataset loaders -------------------------------------------------------------------------------------------------


def test_approx_token_count():
    assert approx_token_count("") == 1
    assert approx_token_count("Hello, world!") == 4
    assert approx_token_count("internationalization") == 3  # long words split like BPE pieces
    assert approx_token_count("pi is 3.14") == 6  # digits one by one
    assert approx_token_count("你好") == 2


def _write_sharegpt(path):
    records = [
        {"id": "a", "conversations": [
            {"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "The capital of France is Paris."},
            {"from": "human", "value": "And of Italy?"},
            {"from": "gpt", "value": "Rome."},
        ]},
        # system turn first, and a trailing human turn with no answer
        {"id": "b", "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello there"},
            {"from": "human", "value": "unanswered"},
        ]},
        {"id": "c", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "   "}]},  # empty reply
        {"id": "d", "conversations": [{"from": "gpt", "value": "no prompt"}]},
        {"id": "e"},
    ]
    path.write_text(json.dumps(records))


def test_load_sharegpt_takes_human_gpt_pairs(tmp_path):
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path)
    pairs = load_sharegpt(path)
    assert pairs.prompt_tokens.tolist() == [7, 4, 1]
    assert pairs.output_tokens.tolist() == [7, 2, 2]


def test_load_burstgpt_uses_request_and_response_tokens(tmp_path):
    path = tmp_path / "burstgpt.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"  # failed request: dropped
        "118,GPT-4,417,276,693,API log\n"
        "130,GPT-4,12000,1000,13000,API log\n"  # over one instance's KV capacity: dropped
    )
    pairs = load_burstgpt(path)
    assert pairs.prompt_tokens.tolist() == [472, 417]
    assert pairs.output_tokens.tolist() == [18, 276]


def test_loaders_reject_wrong_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sharegpt(bad_json)
    no_pairs = tmp_path / "empty.json"
    no_pairs.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        load_sharegpt(no_pairs)
    wrong_csv = tmp_path / "wrong.csv"
    wrong_csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="Request tokens"):
        load_burstgpt(wrong_csv)


def test_make_trace_samples_a_dataset_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path)
    df = make_trace("sharegpt", 1.0, 300, seed=0, dataset_path=path)
    assert set(zip(df["prompt_tokens"], df["output_tokens"], strict=True)) == {(7, 7), (4, 2), (1, 2)}
    pd.testing.assert_frame_equal(df, make_trace("sharegpt", 1.0, 300, seed=0, dataset_path=path))


def test_sample_pairs_is_seeded():
    pairs = sharegpt(50, np.random.default_rng(0))
    a = sample_pairs(pairs, 20, np.random.default_rng(9))
    b = sample_pairs(pairs, 20, np.random.default_rng(9))
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens) and len(a) == 20


# -- trace I/O -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trace.csv", "trace.parquet", "sub/dir/trace.CSV"])
def test_trace_round_trip(tmp_path, name):
    df = make_trace("burstgpt", 2.0, 200, seed=1, arrival="gamma", cv=3.0, priority_fraction=0.3)
    write_trace(df, tmp_path / name)
    pd.testing.assert_frame_equal(read_trace(tmp_path / name), df)


def _good_trace() -> pd.DataFrame:
    return make_trace("S-S", 1.0, 5, seed=0)


def _write_csv(tmp_path, df: pd.DataFrame):
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def _modified(column: str, row: int, value) -> pd.DataFrame:
    df = _good_trace().astype(object)
    df.loc[row, column] = value
    return df


@pytest.mark.parametrize(
    "df, problem",
    [
        (_good_trace().drop(columns=["priority"]), "missing column(s) priority"),
        (_good_trace().iloc[:0], "the trace is empty"),
        (_modified("prompt_tokens", 2, "abc"), "column prompt_tokens has a missing or non-numeric value 'abc' at row 2"),
        (_modified("arrival_s", 1, None), "column arrival_s has a missing or non-numeric value"),
        (_modified("output_tokens", 3, 2.5), "column output_tokens has a non-integer value"),
        (_modified("prompt_tokens", 1, -4), "prompt_tokens must be >= 1, got -4 at row 1"),
        (_modified("output_tokens", 0, 0), "output_tokens must be >= 1, got 0 at row 0"),
        (_modified("arrival_s", 0, -0.5), "arrival_s must be >= 0"),
        (_modified("priority", 4, 2), "priority must be 0 or 1, got 2 at row 4"),
        (_modified("request_id", 4, 0), "request_id values must be unique"),
        (_modified("arrival_s", 3, 0.0), "arrival_s is not sorted: row 3"),
    ],
)
def test_read_trace_errors(tmp_path, df, problem):
    path = _write_csv(tmp_path, df)
    with pytest.raises(TraceError) as info:
        read_trace(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "Fix:" in message


def test_read_trace_file_errors(tmp_path):
    cases = {
        tmp_path / "t.txt": "unknown trace extension '.txt'",
        tmp_path / "missing.csv": "trace file not found",
        tmp_path / "zero.csv": "the trace is empty",
        tmp_path / "garbage.parquet": "cannot be read as PARQUET",
    }
    (tmp_path / "t.txt").write_text("request_id\n0\n")
    (tmp_path / "zero.csv").write_text("")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    for path, problem in cases.items():
        with pytest.raises(TraceError) as info:
            read_trace(path)
        assert str(path) in str(info.value) and problem in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(TraceError, match="unknown trace extension"):
        write_trace(_good_trace(), tmp_path / "t.json")


def test_read_trace_drops_extra_columns(tmp_path):
    df = _good_trace().assign(note="x")
    pd.testing.assert_frame_equal(read_trace(_write_csv(tmp_path, df)), _good_trace())


def test_trace_error_is_a_value_error():
    assert issubclass(TraceError, ValueError)
