"""Click commands of this subpackage, registered on the ``llumnix`` group by ``llumnix.cli``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
