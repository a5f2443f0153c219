"""Aggregation, figures and the claims table: what the workflow calls after the runs."""
