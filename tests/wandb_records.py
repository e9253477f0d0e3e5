"""The tests' W&B run-file reader: ringctl's own (ringctl/runlog.py, what `ringctl metrics` uses)."""

from __future__ import annotations

from ringctl.runlog import config, history, records, run_group, summary

__all__ = ["config", "history", "records", "run_group", "summary"]
