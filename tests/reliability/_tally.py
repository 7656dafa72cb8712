"""What the reliability suite really runs: faults injected, corruptions detected, bad inputs tried.

Tests call :func:`tally` as they go; the session prints the totals (and writes
them to ``<basetemp>/reliability-counts.json``, or to $TCSKD_RELIABILITY_COUNTS).
"""

from __future__ import annotations

from collections import Counter

KINDS = ("faults", "corruptions", "bad_inputs")
TOTALS: Counter = Counter()
DETAIL: Counter = Counter()


def tally(kind: str, what: str, n: int = 1) -> None:
    """Count ``n`` cases of ``kind`` (faults | corruptions | bad_inputs), labelled ``what``."""
    if kind not in KINDS:
        raise ValueError(f"unknown tally kind {kind!r}")
    TOTALS[kind] += n
    DETAIL[(kind, what)] += n
