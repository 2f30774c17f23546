"""Fault injection for the reliability tests: real signals and NaNs at named points of a real run.

LENS_TUNE_FAULT holds comma-separated `ACTION@POINT` or `ACTION@POINT=N` items: the action fires the N-th time (default
the first) this process passes the point. Actions: `sigint`, `sigterm`, `sigkill` (sent to this process with
os.kill, so the real handlers run), `nan` (the caller poisons a value). Points:

    micro              after each micro-batch's backward pass
    loss, grad         the step's loss / gradients (for `nan`)
    caching            after each text feature or latent is encoded
    class-images       after each generated class image
    sampling           after each validation image
    checkpoint-write   inside a checkpoint save, after its adapter and before its states are written
    shard-write        inside a cache shard write, after the data file is written and before it is renamed

Unset (always, outside the tests) every point is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
_specs: dict[str, list[tuple[str, int]]] | None = None
_passes: dict[str, int] = {}


def _parse(text: str) -> dict[str, list[tuple[str, int]]]:
    specs: dict[str, list[tuple[str, int]]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, where = item.partition("@")
        point, _, nth = where.partition("=")
        if action not in (*_SIGNALS, "nan") or not point or (nth and not nth.isdigit()):
            raise ValueError(f"LENS_TUNE_FAULT: cannot read {item!r} (ACTION@POINT[=N], ACTION one of sigint, sigterm, sigkill, nan)")
        specs.setdefault(point, []).append((action, int(nth or 1)))
    return specs


def fault_point(point: str) -> bool:
    """Pass a named point: send the signal the spec asks for here, or return True when a `nan` fault fires."""
    global _specs
    if _specs is None:
        _specs = _parse(os.environ.get("LENS_TUNE_FAULT", ""))
    actions = _specs.get(point)
    if not actions:
        return False
    _passes[point] = count = _passes.get(point, 0) + 1
    poison = False
    for action, nth in actions:
        if count != nth:
            continue
        if action == "nan":
            poison = True
        else:
            os.kill(os.getpid(), _SIGNALS[action])
    return poison
