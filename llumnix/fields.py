"""Settings declared once.

A rule-owning config (a frozen dataclass in ``core/``, ``policies/`` or ``sim/``) declares each setting with its
default and a one-line help, ``field(default=..., metadata={"help": ...})``. Every other config that carries the same
setting (the serving cluster's pydantic models, the experiment schema, the real-cluster supervisor) declares it with
:func:`pydantic_field` or :func:`dataclass_field`, which copy the default, help and choices from the owner, and the
command line is generated from the fields (``llumnix.cli_options``). Nothing here imports the rest of the package.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import pydantic
from pydantic.fields import FieldInfo

REQUIRED = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of a config class: its name, type (``None`` stripped from an optional one), default (``REQUIRED``
    when it has none), help, and the values it may take (from a ``Literal`` type or ``metadata["choices"]``)."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    optional: bool = False  # the type admits None


def settings(cls: type) -> list[Setting]:
    """Every field of a dataclass or pydantic model, in declaration order."""
    if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
        return [_pydantic_setting(name, info) for name, info in cls.model_fields.items()]
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return [_dataclass_setting(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]
    raise TypeError(f"{cls!r} is neither a dataclass nor a pydantic model")


def setting(cls: type, name: str) -> Setting:
    for s in settings(cls):
        if s.name == name:
            return s
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default_of(cls: type, name: str) -> Any:
    """The declared default of ``cls.name`` (a ``default_factory`` is called)."""
    return setting(cls, name).default


def pydantic_field(owner: type, name: str, help: str | None = None, **constraints: Any) -> Any:
    """A pydantic ``Field`` for the same setting as ``owner.name``: its default, help (``description``; ``help``
    words it for this model) and choices, plus this model's ``constraints`` (``gt=0`` ...)."""
    s = setting(owner, name)
    extra = {"choices": list(s.choices)} if s.choices is not None else None
    return pydantic.Field(s.default, description=help or s.help, json_schema_extra=extra, **constraints)


def dataclass_field(owner: type, name: str, help: str | None = None, choices: tuple | None = None) -> Any:
    """A dataclass ``field`` for the same setting as ``owner.name``: its default, help and choices (``help`` and
    ``choices`` word and narrow them for this config)."""
    s = setting(owner, name)
    choices = choices or s.choices
    metadata = {"help": help or s.help} | ({"choices": choices} if choices is not None else {})
    return dataclasses.field(default=s.default, metadata=metadata)


def unitless(name: str) -> str:
    """A setting's name without its seconds suffix, as its flag spells it: ``pairing_interval_s`` -> ``pairing_interval``."""
    return name.removesuffix("_s")


# -- reading fields --------------------------------------------------------------------------------------------------
def _dataclass_setting(f: dataclasses.Field, hint: Any) -> Setting:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = REQUIRED
    return _make(f.name, hint, default, f.metadata.get("help", ""), f.metadata.get("choices"))


def _pydantic_setting(name: str, info: FieldInfo) -> Setting:
    default = REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return _make(name, info.annotation, default, info.description or "", extra.get("choices"))


def _make(name: str, hint: Any, default: Any, help: str, choices: Any) -> Setting:
    base, optional = _strip_none(hint)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        base = type(choices[0])
    return Setting(name, base, default, help, tuple(choices) if choices is not None else None, optional)


def _strip_none(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False
