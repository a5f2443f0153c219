"""Each default written once: the command line and every config that repeats a setting agree with the config that
owns it (``llumnix.fields``, ``llumnix.cli_options``)."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from llumnix.analysis.experiments import AutoscaleSpec, Experiment, RealSpec, SystemSpec
from llumnix.cli import main
from llumnix.cli_options import SettingOption, flag_of, options, values_by_config
from llumnix.core.llumlet import LlumletConfig
from llumnix.core.local_scheduler import SchedulerConfig
from llumnix.core.migration import MigrationConfig
from llumnix.fields import REQUIRED, default_of, pydantic_field, setting, settings
from llumnix.policies.pairing import PairingConfig
from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import PAPER_SYSTEMS, PER_SYSTEM_OPTIONS, SystemConfig
from llumnix.profiles import DEFAULT_PROFILE
from llumnix.runtime.cpuload import QuietConfig
from llumnix.runtime.serve_config import InstanceSpec, ServeConfig
from llumnix.runtime.supervisor import RealClusterConfig
from llumnix.sim.simulator import SimConfig

OWNERS = (SchedulerConfig, LlumletConfig, MigrationConfig, PairingConfig, SystemConfig, ScalingConfig, SimConfig,
          QuietConfig)
COPIES = (ServeConfig, InstanceSpec, RealClusterConfig, SystemSpec, AutoscaleSpec, RealSpec, Experiment)
COMMANDS = ("simulate", "serve", "real-cluster")

# Options whose default is not their field's, and why.
CLI_EXCEPTIONS = {
    ("serve", "block_size"): "None lets InstanceSpec pick the backend's block size (vllm: 32)",
    ("simulate", "autoscale"): "a flag; SystemConfig.autoscale is the ScalingConfig it builds",
}
# Fields of the same name in two configs that are different settings, and why.
FIELD_EXCEPTIONS = {
    "startup_delay_s": "simulator: the whole engine start (5 s); serve: an extra wait on top of a real start",
    "instances": "serve's small local cluster (2), real-cluster's (4), an experiment's (the simulator's 16)",
    "num_blocks": "serve: the backend's pool; real-cluster: a small pool, for memory pressure",
    "num_cpus_per_instance": "serve: a CPU per actor; real-cluster: half, to fit 4 instances on a small machine",
    "startup_timeout_s": "serve: the instance actors' start; real-cluster: the whole server's",
    "migration": "SimConfig.migration is the MigrationConfig, elsewhere the on / off switch",
    "autoscale": "SystemConfig.autoscale is the ScalingConfig, elsewhere the on / off switch",
}


def command(name: str) -> click.Command:
    return main.commands[name]


def fields_of(cls: type) -> dict[str, object]:
    return {s.name: s.default for s in settings(cls)}


def same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_cli_default_is_its_config_fields(name):
    cmd = command(name)
    generated = [p for p in cmd.params if isinstance(p, SettingOption)]
    assert generated, f"{name}: no option generated from a config"
    classes = {p.origin[0] for p in generated}
    for param in cmd.params:
        if isinstance(param, SettingOption):
            cls, field_name = param.origin
        else:  # hand-written: guarded where it has the name of a field of the configs the command builds
            owners = [c for c in classes if param.name in fields_of(c)]
            if not owners:
                continue
            cls, field_name = owners[0], param.name
        if (name, param.name) in CLI_EXCEPTIONS:
            continue
        expected = default_of(cls, field_name)
        if expected is REQUIRED:
            assert param.required, (name, param.name)
        else:
            assert same(param.default, expected), f"{name} {param.opts}: {param.default!r} != {cls.__name__}.{field_name}"


def test_hand_written_defaults_share_their_constants():
    profile = next(p for p in command("simulate").params if p.name == "profile_name")
    assert profile.default == DEFAULT_PROFILE == default_of(InstanceSpec, "profile") == default_of(Experiment, "profile")


def test_configs_that_repeat_a_setting_repeat_its_default():
    every = [(cls, s) for cls in OWNERS + COPIES for s in settings(cls)]
    for (cls_a, a), (cls_b, b) in itertools.combinations(every, 2):
        if a.name != b.name or cls_a is cls_b or a.name in FIELD_EXCEPTIONS or a.name in PER_SYSTEM_OPTIONS:
            continue
        if REQUIRED in (a.default, b.default):
            continue
        assert same(a.default, b.default), f"{cls_a.__name__}.{a.name} = {a.default!r}, {cls_b.__name__}: {b.default!r}"
    # Renamed on the way: the serving cluster's spelling of core settings.
    for copy, owner in [
        (setting(InstanceSpec, "last_stage_blocks"), setting(MigrationConfig, "last_stage_max_blocks")),
        (setting(ServeConfig, "scale_interval_s"), setting(ScalingConfig, "check_interval_s")),
        (setting(RealClusterConfig, "backend"), setting(InstanceSpec, "backend")),
    ]:
        assert copy.default == owner.default
    # A setting a system may choose: None ("the --policy's") everywhere but in the config that owns the rule, and the
    # paper's systems take that owner's default.
    for name in PER_SYSTEM_OPTIONS:
        owner = SystemConfig.__dataclass_fields__[name].metadata["owner"]
        copies = [cls for cls in OWNERS + COPIES if cls is not owner and name in fields_of(cls)]
        assert SystemConfig in copies and all(fields_of(cls)[name] is None for cls in copies), name
        assert all(getattr(SystemConfig(policy=p), name) == default_of(owner, name) for p in PAPER_SYSTEMS)


def test_every_setting_has_help():
    for cls in (*OWNERS, ServeConfig, InstanceSpec, RealClusterConfig):
        for s in settings(cls):
            assert s.help, f"{cls.__name__}.{s.name} has no help"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_flag_with_its_default(name):
    cmd = command(name)
    text = CliRunner().invoke(main, [name, "--help"]).output
    ctx = click.Context(cmd, info_name=name, show_default=True)
    for param in cmd.params:
        flags, help_text = param.get_help_record(ctx)
        assert all(flag in text for flag in param.opts + param.secondary_opts)
        if param.default is not None and not param.required:
            assert "[default: " in help_text, (flags, help_text)


def test_generated_options():
    class Model(BaseModel):
        pairing_interval_s: float = pydantic_field(SystemConfig, "pairing_interval_s")
        kind: Literal["a", "b"] = Field("a", description="The kind.")
        flag: bool = pydantic_field(SystemConfig, "migration")
        count: int | None = Field(None, description="A count.")
        quiet: bool = False

    assert flag_of("pairing_interval_s") == "--pairing-interval" and flag_of("max_num_seqs") == "--max-num-seqs"
    with pytest.raises(ValueError, match="Model.quiet has no help"):
        options(Model)
    seen = {}

    @click.command()
    @options(Model, exclude=["quiet"])
    @click.pass_context
    def cmd(ctx, **_):
        seen.update(values_by_config(ctx)[Model])

    r = CliRunner().invoke(cmd, ["--pairing-interval", "0.5", "--kind", "b", "--no-flag"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen == {"pairing_interval_s": 0.5, "kind": "b", "flag": False, "count": None}
    assert "'c' is not one of 'a', 'b'" in CliRunner().invoke(cmd, ["--kind", "c"]).output
