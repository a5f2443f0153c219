"""Per-request metrics and run summaries, computed the same way for simulated and real runs."""

from llumnix.metrics.summary import SUMMARY_LATENCY_KEYS, request_table, summarize

__all__ = ["SUMMARY_LATENCY_KEYS", "request_table", "summarize"]
