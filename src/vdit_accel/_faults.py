"""Test-only fault injection: ``VDIT_ACCEL_FAULT_AT=<event>:<n>`` kills this process with SIGKILL at the n-th
``<event>`` (1-based), so that the fault tests (``tests/test_faults.py``) can stop ``train`` and ``search`` at
exact, seeded points (after the n-th training step, fitness evaluation or checkpoint file write) and check that a
resume ends exactly where an uninterrupted run ends.

Not a user feature: nothing reads the variable but :func:`fault_point`, which does nothing when it is unset (the
cost is one environment lookup per event). Events:

- ``train_step``: after an optimiser step (before its checkpoint, if one is due);
- ``train_write``: after each file of a training checkpoint is written (the three tensor files, then the new
  ``state.json.tmp`` before it replaces ``state.json``): kills in the middle of a checkpoint write;
- ``search_eval``: after a fitness evaluation of the budget search;
- ``search_write``: after each checkpoint file of a search is written, before it is moved into place (the dense
  reference, the evolution state).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "VDIT_ACCEL_FAULT_AT"
EVENTS = ("train_step", "train_write", "search_eval", "search_write")
_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    """Count ``event``; SIGKILL this process when ``VDIT_ACCEL_FAULT_AT`` names it and its count is reached."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != event:
        return
    _counts[event] = _counts.get(event, 0) + 1
    if str(_counts[event]) == n.strip():
        os.kill(os.getpid(), signal.SIGKILL)
