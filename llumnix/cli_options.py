"""Click options generated from config fields (``llumnix.fields``): each default and help is written once, in the
config class, and a command's flags follow it.

A field ``pairing_interval_s: float = 0.1`` becomes ``--pairing-interval FLOAT [default: 0.1]`` with the field's
help; the parameter keeps the field's name (``pairing_interval_s``), and a command builds each config from its parameters
with :func:`values_by_config`. A ``Literal`` type or ``metadata["choices"]`` becomes a
``click.Choice``; a bool becomes ``--x/--no-x`` (so ``--priorities`` and ``--no-migration`` keep working).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from llumnix.fields import REQUIRED, Setting, setting, settings, unitless

_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


class SettingOption(click.Option):
    """A click option generated from a config field; ``origin`` is ``(config class, field name)``."""

    def __init__(self, *args: Any, origin: tuple[type, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin = origin


def flag_of(name: str) -> str:
    """The flag of a setting: ``pairing_interval_s`` -> ``--pairing-interval`` (the seconds suffix dropped)."""
    return "--" + unitless(name).replace("_", "-")


def option(cls: type, name: str, flag: str | None = None, **overrides: Any) -> Callable:
    """A click option for the field ``cls.name``; ``flag`` renames it, ``overrides`` replace click keywords (say why
    in the help where one replaces the default)."""
    return _option(setting(cls, name), cls, flag, overrides)


def options(
    cls: type,
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    flags: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable:
    """Options for the fields ``names`` of ``cls`` (default: every field but ``exclude``), listed in that order.
    ``flags``: field name -> flag spelling where it is not :func:`flag_of`; ``overrides``: field name -> click keywords."""
    flags, overrides = flags or {}, overrides or {}
    chosen = [setting(cls, n) for n in names] if names is not None else [s for s in settings(cls) if s.name not in exclude]
    decorators = [_option(s, cls, flags.get(s.name), dict(overrides.get(s.name, {}))) for s in chosen]

    def apply(f: Callable) -> Callable:
        for decorate in reversed(decorators):  # click lists options in the order they decorate from the top
            f = decorate(f)
        return f

    return apply


def values_by_config(ctx: click.Context) -> dict[type, dict[str, Any]]:
    """The command's parameter values, grouped by the config class their option was generated from (field name ->
    value), to build each config from them."""
    grouped: dict[type, dict[str, Any]] = {}
    for param in ctx.command.params:
        if isinstance(param, SettingOption):
            cls, name = param.origin
            grouped.setdefault(cls, {})[name] = ctx.params[param.name]
    return grouped


_TRACE_OPTIONS = (
    click.option("--workload", required=True,
                 help="S-S, M-M, L-L, S-L, L-S (input-output lengths), sharegpt or burstgpt."),
    click.option("--rate", type=float, required=True, help="Mean arrival rate in requests per second."),
    click.option("--num-requests", type=int, default=10_000, help="Number of requests in the trace."),
    click.option("--arrival", type=click.Choice(["poisson", "gamma"]), default="poisson", help="Arrival process."),
    click.option("--cv", type=float, default=1.0, help="Coefficient of variation of Gamma inter-arrival times."),
    click.option("--priority-fraction", type=float, default=0.0, help="Fraction of requests marked high priority."),
    click.option("--dataset", "dataset_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 default=None,
                 help="Real ShareGPT JSON / BurstGPT CSV to sample lengths from (default: the built-in matching "
                      "generators)."),
    click.option("--lengths", type=click.Choice(["authors", "table1"]), default="authors",
                 help="authors: the artifact's Zipf generator (S/M/L) and real ShareGPT rows when installed; "
                      "table1: fits of Table 1's percentiles."),
    click.option("--seed", type=int, required=True, help="Random seed: the same seed gives the same trace."),
    click.option("--stream", type=click.Choice(["seeded", "artifact"]), default="seeded",
                 help="artifact: replay the artifact's own trace of a generated workload (its seeded streams, "
                      "llumnix/workload/artifact.py); --seed is then unused."),
)  # fmt: skip


def trace_options(f: Callable) -> Callable:
    """The options of a generated trace, the same in every command that makes one (``llumnix trace``,
    ``llumnix capped-trace``): their parameters are ``llumnix.workload.make_trace``'s keywords, so a command passes
    them on as they are (``make_trace(**spec)``)."""
    for decorate in reversed(_TRACE_OPTIONS):
        f = decorate(f)
    return f


def _option(s: Setting, cls: type, flag: str | None, overrides: dict[str, Any]) -> Callable:
    if not s.help:
        raise ValueError(f"{cls.__name__}.{s.name} has no help: declare it with metadata={{'help': ...}}")
    flag = flag or flag_of(s.name)
    kwargs: dict[str, Any] = {"help": s.help, "origin": (cls, s.name), "cls": SettingOption}
    if s.default is REQUIRED:
        kwargs["required"] = True
    else:
        kwargs["default"] = s.default
    if s.type is bool and not s.optional:
        decls = [f"{flag}/--no-{flag.removeprefix('--')}"]
    else:
        decls = [flag]
        kwargs["type"] = click.Choice([str(c) for c in s.choices]) if s.choices else _TYPES.get(s.type, click.STRING)
    return click.option(*decls, s.name, **(kwargs | overrides))
