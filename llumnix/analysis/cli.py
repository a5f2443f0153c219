"""Click commands for the workflow's analysis steps (registered on the ``llumnix`` group)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
