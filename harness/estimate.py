"""Cost estimates for --dry-run (filled in from benchmark measurements)."""
from __future__ import annotations


def estimate_plan(plan, cfg) -> dict:
    return {}
