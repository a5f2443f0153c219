"""Llumnix reproduction: dynamic scheduling and live migration for multi-instance LLM serving."""

__version__ = "0.1.0"
