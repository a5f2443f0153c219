"""Experiment files, aggregation and the claims table, on small hand-built inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llumnix.analysis.aggregate import aggregate_runs, flatten_summary
from llumnix.analysis.claims import (
    Band,
    ClaimSpec,
    claims_table,
    load_claims,
    per_seed_values,
    render_markdown,
    verdict,
)
from llumnix.analysis.experiments import (
    Experiment,
    ExperimentError,
    expand_runs,
    load_experiment,
    load_experiments,
    simulate_args,
    trace_args,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

MINIMAL = {
    "name": "mini",
    "title": "mini",
    "paper": "something",
    "figure": {"kind": "lines", "metrics": ["prefill_mean_s"]},
    "traces": {"S-S": {"workload": "S-S", "rates": [1, 2, 3]}},
    "systems": {
        "infaas++": {"policy": "infaas++", "label": "INFaaS++"},
        "llumnix": {"policy": "llumnix", "label": "L"},
    },
    "scales": {"quick": {"num_requests": 10, "rates": "extremes"}, "paper": {"num_requests": 100, "seeds": 3}},
}


def write_yaml(tmp_path: Path, data: dict, name: str = "mini") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- experiment files ----------------------------------------------------------------------------------------------
def test_repository_experiments_and_claims_validate():
    exps = load_experiments(EXPERIMENTS)
    assert {"fig10", "fig11", "fig12", "fig13", "fig14", "fig15", "fig16"} <= set(exps)
    specs = load_claims(EXPERIMENTS / "claims.yaml")
    assert {s.experiment for s in specs} <= set(exps)
    for exp in exps.values():
        if exp.kind == "simulation":
            quick, paper = expand_runs(exp, "quick"), expand_runs(exp, "paper")
            assert 0 < len(quick) <= len(paper)
            assert exp.scale("paper").num_requests == 10_000 and exp.scale("paper").seeds == 3


def test_paper_scale_runs_every_rate_and_quick_the_deciding_points():
    exp = load_experiment(EXPERIMENTS / "fig11.yaml")
    paper = {(r.trace, r.rate) for r in expand_runs(exp, "paper")}
    assert paper == {(t, rate) for t, spec in exp.traces.items() for rate in spec.rates}
    quick = expand_runs(exp, "quick")
    # each trace's heaviest rate, S-L at its lightest; Round-Robin on the real datasets only
    expected = {(t, 4.1 if t == "S-L" else max(spec.rates)) for t, spec in exp.traces.items()}
    assert {(r.trace, r.rate) for r in quick} == expected
    assert {r.trace for r in quick if r.system == "round-robin"} == {"sharegpt", "burstgpt"}
    assert exp.scale("quick").num_requests == exp.scale("paper").num_requests


def test_scale_picks_rates_per_trace_and_traces_per_system(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    data["traces"]["L-L"] = {"workload": "L-L", "rates": [4, 5, 6]}
    data["scales"]["quick"] = {
        "num_requests": 10,
        "rates": "highest",
        "trace_rates": {"L-L": [4, 6]},
        "system_traces": {"infaas++": ["L-L"]},
    }
    exp = load_experiment(write_yaml(tmp_path, data))
    assert exp.rates("S-S", "quick") == [3] and exp.rates("L-L", "quick") == [4, 6]
    runs = {(r.trace, r.rate, r.system) for r in expand_runs(exp, "quick")}
    assert runs == {("S-S", 3, "llumnix"), ("L-L", 4, "llumnix"), ("L-L", 6, "llumnix"),
                    ("L-L", 4, "infaas++"), ("L-L", 6, "infaas++")}  # fmt: skip
    assert exp.scale("quick").grid_note() == [
        "only the heaviest rate of each trace", "L-L at 4, 6 req/s only", "infaas++ on L-L only"
    ]  # fmt: skip
    assert len(expand_runs(exp, "paper")) == 2 * 3 * 2 * 3  # unaffected: traces x rates x systems x seeds


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["traces"]["S-S"].update(rates=[-1]), "traces.S-S.rates.0"),
        (lambda d: d["traces"]["S-S"].update(workload="XL"), "traces.S-S.workload"),
        (lambda d: d["systems"]["llumnix"].update(migration_treshold=3), "systems.llumnix.migration_treshold"),
        (lambda d: d["systems"]["llumnix"].update(policy="fifo"), "systems.llumnix.policy"),
        (lambda d: d["scales"].pop("paper"), "missing paper"),
        (lambda d: d["scales"]["quick"].update(traces=["nope"]), "scales.quick.traces"),
        (lambda d: d.update(name="other"), "name"),
        (lambda d: d["scales"]["quick"].update(num_requests=0), "scales.quick.num_requests"),
        (lambda d: d["scales"]["quick"].update(rates="lowest"), "scales.quick.rates"),
        (lambda d: d["scales"]["quick"].update(trace_rates={"S-S": [2.5]}), "scales.quick.trace_rates.S-S"),
        (lambda d: d["scales"]["quick"].update(trace_rates={"nope": [1]}), "scales.quick.trace_rates"),
        (lambda d: d["scales"]["quick"].update(trace_rates={"S-S": []}), "scales.quick.trace_rates.S-S"),
        (lambda d: d["scales"]["quick"].update(system_traces={"fifo": ["S-S"]}), "scales.quick.system_traces"),
        (lambda d: d["scales"]["quick"].update(system_traces={"llumnix": ["nope"]}), "system_traces.llumnix"),
    ],
)
def test_invalid_experiment_names_the_bad_field(tmp_path, change, field):
    data = json.loads(json.dumps(MINIMAL))
    change(data)
    with pytest.raises(ExperimentError, match="mini.yaml") as err:
        load_experiment(write_yaml(tmp_path, data))
    assert field in str(err.value)


def test_command_lines_follow_the_experiment():
    exp = load_experiment(EXPERIMENTS / "fig11.yaml")
    assert "--migration-threshold 10" in simulate_args(exp, "M-M", "llumnix", "0")
    assert "--migration-threshold 3" in simulate_args(exp, "S-S", "llumnix", "0")
    assert "--policy round-robin" in simulate_args(exp, "S-S", "round-robin", "2")
    args = trace_args(exp, "S-L", "4.15", "1", "paper")
    assert "--rate 4.15" in args and "--num-requests 10000" in args and "--seed 1" in args
    fig13 = load_experiment(EXPERIMENTS / "fig13.yaml")
    assert "--cv 4 --priority-fraction 0.1" in trace_args(fig13, "cv4", "26", "0", "quick")
    assert "--priorities" in simulate_args(fig13, "cv4", "llumnix", "0")
    assert "--priorities" not in simulate_args(fig13, "cv4", "llumnix-base", "0")


def test_sweep_expands_systems_with_linked_thresholds():
    exp = load_experiment(EXPERIMENTS / "fig15.yaml")
    ids = exp.system_ids("paper")
    assert len(ids) == 2 * len(exp.sweep.values)
    family, spec, value = exp.resolve_system("llumnix-scale-up25")
    assert (family, value) == ("llumnix", 25)
    assert (spec.autoscale.scale_up, spec.autoscale.scale_down) == (25, 75)
    args = simulate_args(exp, "gamma-cv2", "infaas++-scale-up45", "0")
    assert "--scale-up 45 --scale-down 95" in args and "--initial-instances 8" in args


def test_every_figure_kind_of_the_schema_is_registered_once():
    from typing import get_args

    from llumnix.analysis.experiments import FigureSpec
    from llumnix.analysis.figures import plot_experiment  # noqa: F401  (registers the kinds)
    from llumnix.analysis.plots import FIGURE_KINDS

    assert FIGURE_KINDS.names() == sorted(get_args(FigureSpec.model_fields["kind"].annotation))
    assert FIGURE_KINDS.get("timeline").needs_timeline and not FIGURE_KINDS.get("lines").needs_timeline
    with pytest.raises(ValueError, match="registered twice"):
        FIGURE_KINDS.register("lines")(lambda exp, data, out: [])
    with pytest.raises(ValueError, match="unknown figure kind"):
        FIGURE_KINDS.get("pie")


# -- aggregation ---------------------------------------------------------------------------------------------------
def test_flatten_summary():
    flat = flatten_summary({"a": 1, "high": {"e2e_mean_s": 2.0, "requests": 3}, "policy": "x"})
    assert flat == {"a": 1, "high_e2e_mean_s": 2.0, "high_requests": 3, "policy": "x"}


def test_aggregate_runs_one_row_per_run(tmp_path):
    exp = Experiment.model_validate(MINIMAL)
    runs = expand_runs(exp, "quick")
    assert len(runs) == 2 * 2  # rates 1 and 3, two systems, one seed
    for i, run in enumerate(runs):
        out = tmp_path / run.run_dir("quick")
        out.mkdir(parents=True)
        summary = {"requests": 10, "prefill_mean_s": float(i), "policy": "ignored", "high": {"e2e_mean_s": 1.0}}
        (out / "summary.json").write_text(json.dumps(summary))
    df = aggregate_runs(exp, "quick", tmp_path)
    assert len(df) == 4
    assert list(df["prefill_mean_s"]) == [0.0, 1.0, 2.0, 3.0]
    assert set(df["rate"]) == {1.0, 3.0}
    assert set(df["system"]) == {"infaas++", "llumnix"}
    assert (df["high_e2e_mean_s"] == 1.0).all() and (df["scale"] == "quick").all()
    assert (df["num_requests"] == 10).all()


def test_aggregate_runs_names_a_missing_run(tmp_path):
    exp = Experiment.model_validate(MINIMAL)
    with pytest.raises(FileNotFoundError, match=r"runs/quick/mini/S-S/r1/infaas\+\+/s0/summary.json"):
        aggregate_runs(exp, "quick", tmp_path)


# -- claims --------------------------------------------------------------------------------------------------------
def frame(rows):
    return pd.DataFrame(rows, columns=["trace", "rate", "system", "seed", "metric", "cost"]).assign(
        sweep_value=math.nan, scale="test", num_requests=100
    )


def spec(**kw) -> ClaimSpec:
    base = dict(
        id="c", figure="Fig", claim="claim", experiment="e", kind="speedup", metric="metric", baseline="b",
        system="s", paper=4.0, paper_text="4x", reproduced={"min": 2.0, "max": 12.0}, partly={"min": 1.2},
    )  # fmt: skip
    base.update(kw)
    return ClaimSpec(**base)


TWO_SEEDS = frame(
    [
        # trace, rate, system, seed, metric, cost
        ("A", 1, "b", 0, 8.0, 10), ("A", 1, "s", 0, 2.0, 8),
        ("A", 2, "b", 0, 3.0, 12), ("A", 2, "s", 0, 3.0, 11),
        ("A", 1, "b", 1, 6.0, 10), ("A", 1, "s", 1, 3.0, 9),
        ("A", 2, "b", 1, 4.0, 12), ("A", 2, "s", 1, 2.0, 10),
    ]
)  # fmt: skip


def test_speedup_is_computed_per_seed_then_reduced_over_points():
    values = per_seed_values(TWO_SEEDS, spec(over="max"))
    assert values.to_dict() == {0: 4.0, 1: 2.0}
    assert per_seed_values(TWO_SEEDS, spec(over="mean")).to_dict() == {0: 2.5, 1: 2.0}


def test_reduction_overhead_and_value():
    assert per_seed_values(TWO_SEEDS, spec(kind="reduction", over="max")).to_dict() == {0: 0.75, 1: 0.5}
    assert per_seed_values(TWO_SEEDS, spec(kind="overhead", over="max")).to_dict() == {0: 0.0, 1: -0.5}
    value = spec(kind="value", baseline=None, over="max", paper=3.0, reproduced={"max": 3.0}, partly={"max": 5.0})
    assert per_seed_values(TWO_SEEDS, value).to_dict() == {0: 3.0, 1: 3.0}


def test_where_filters_points():
    only_rate_2 = spec(where={"rate": [2]})
    assert per_seed_values(TWO_SEEDS, only_rate_2).to_dict() == {0: 1.0, 1: 2.0}


def test_zero_baseline_points_are_left_out():
    df = frame([("A", 1, "b", 0, 0.0, 1), ("A", 1, "s", 0, 0.0, 1), ("A", 2, "b", 0, 2.0, 1), ("A", 2, "s", 0, 1.0, 1)])
    assert per_seed_values(df, spec(kind="reduction")).to_dict() == {0: 0.5}


def test_matched_cost_interpolates_the_baseline_curve():
    # Baseline: latency 10 at cost 10, latency 2 at cost 14. System: latency 6 at cost 9 -> baseline needs 12
    # (linear in latency); the saving in the authors' arithmetic is 12 / 9 - 1. tests/test_claims.py has more.
    df = frame([("A", 1, "b", 0, 10.0, 10), ("A", 1, "s", 0, 6.0, 9)])
    df = pd.concat([df, frame([("A", 1, "b", 0, 2.0, 14)])], ignore_index=True)
    df["sweep_value"] = [5, 5, 25]
    s = spec(kind="matched_cost", cost="cost", pair_on=["sweep_value"], paper=0.36, unit="%", interpolate="linear",
             reproduced={"min": 0.18}, partly={"min": 0.05})  # fmt: skip
    assert per_seed_values(df, s)[0] == pytest.approx(12 / 9 - 1)
    # Faster than every baseline point: the curves do not overlap, so there is no saving at equal latency.
    df.loc[1, "metric"] = 1.0
    assert math.isnan(per_seed_values(df, s)[0])


def test_verdict_bands():
    s = spec()
    assert verdict(4.0, s) == "reproduced"
    assert verdict(1.5, s) == "partly"
    assert verdict(0.9, s) == "not reproduced"
    assert verdict(math.nan, s) == "not reproduced"
    assert Band(min=1.0).contains(1.0) and not Band(max=1.0).contains(1.1)


def test_paper_value_must_lie_in_its_own_reproduced_band():
    with pytest.raises(ValueError, match="outside"):
        spec(paper=50.0)


def test_claims_table_computes_from_data_and_marks_missing_experiments():
    specs = [spec(id="here"), spec(id="absent", experiment="nowhere")]
    table = claims_table(specs, {"e": TWO_SEEDS})
    here, absent = table.iloc[0], table.iloc[1]
    assert here["ours_mean"] == pytest.approx(3.0)
    assert (here["ours_min"], here["ours_max"], here["seeds"]) == (2.0, 4.0, 2)
    assert here["verdict"] == "reproduced" and here["scale"] == "test, 100 req/run, 2 seeds"
    assert absent["verdict"] == "not run" and math.isnan(absent["ours_mean"])
    md = render_markdown(table)
    assert "3.00x (2.00x to 4.00x)" in md and "**not run**" in md and "1 reproduced" in md


def test_claim_on_a_missing_column_is_not_measured_with_the_reason():
    table = claims_table([spec(metric="nope")], {"e": TWO_SEEDS})
    assert table.iloc[0]["verdict"] == "not measured"
    assert "nope" in table.iloc[0]["note"]


def test_a_lines_figure_of_one_rate_keeps_its_points_off_the_frame_and_its_log_axes_labelled(tmp_path, monkeypatch):
    """The quick Fig 11 runs one rate per trace: a lone point gets headroom, a log axis whole decades (tick labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llumnix.analysis import plots
    from llumnix.analysis.figures.lines import plot_lines

    exp = load_experiment(EXPERIMENTS / "fig11.yaml")
    rows = [{"group": "S-S", "trace": "S-S", "rate": 36.0, "cv": 1.0, "system": s, "system_label": label, "seed": 0,
             "scale": "quick", "num_requests": 10000, **{m: v for m in exp.figure.metrics}}
            for s, label, v in (("infaas++", "INFaaS++", 3.1), ("llumnix", "Llumnix", 1.9))]
    captured = {}
    real_finish = plots.finish

    def keep(fig, exp_, note, out):
        captured["axes"], captured["note"] = fig.axes, note
        return real_finish(fig, exp_, note, out)

    import llumnix.analysis.figures.lines as lines

    monkeypatch.setattr(lines, "finish", keep)
    plot_lines(exp, pd.DataFrame(rows), tmp_path / "f.png")
    log_ax, linear_ax = captured["axes"][0], captured["axes"][2]  # prefill mean [log], decode mean
    assert log_ax.get_ylim() == pytest.approx((1.0, 10.0))
    assert linear_ax.get_ylim()[0] == 0 and linear_ax.get_ylim()[1] > 3.1 * 1.1
    assert "calibrated on the paper's INFaaS++ curves" in captured["note"]
    plt.close("all")


def test_a_figure_note_says_when_points_have_different_seed_counts():
    from llumnix.analysis.plots import scale_note

    exp = load_experiment(EXPERIMENTS / "fig11.yaml")
    row = {"trace": "L-L", "system": "llumnix", "scale": "paper", "num_requests": 10000}
    data = pd.DataFrame([row | {"rate": 2.6, "seed": s} for s in range(3)] + [row | {"rate": 2.8, "seed": 0}])
    assert "1-3 seeds per point" in scale_note(exp, data)
    assert "3 seeds." in scale_note(exp, data[data["rate"] == 2.6])
