"""Per-request metrics, run tables and summaries, computed the same way for simulated and real runs."""

from llumnix.metrics.summary import SUMMARY_LATENCY_KEYS, summarize
from llumnix.metrics.tables import (
    INSTANCE_COLUMNS,
    MIGRATION_COLUMNS,
    REQUEST_COLUMNS,
    STEP_COLUMNS,
    InstanceSample,
    fragmentation,
    instance_rows,
    instance_table,
    migration_summary,
    migration_table,
    request_table,
    step_table,
    write_outputs,
)

__all__ = [
    "INSTANCE_COLUMNS",
    "MIGRATION_COLUMNS",
    "REQUEST_COLUMNS",
    "STEP_COLUMNS",
    "SUMMARY_LATENCY_KEYS",
    "InstanceSample",
    "fragmentation",
    "instance_rows",
    "instance_table",
    "migration_summary",
    "migration_table",
    "request_table",
    "step_table",
    "summarize",
    "write_outputs",
]
