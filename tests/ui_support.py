"""Helpers of the dashboard tests: recipes, free ports, polling. The fixtures are in tests/ui_fixtures.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Both the fixture's quickstart run and long.yaml train the tiny model with few class images and one-seed samples
# of few steps (fast on a CPU, and long.yaml finds the fixture's caches). long.yaml runs until it is stopped, with no
# samples or checkpoints on the way (a stop writes one).
FAST = ["model.source=tiny", "dreambooth.num_class_images=2", "dreambooth.class_image_steps=4", "validation.seeds=[0]",
        "validation.steps=2"]
LONG_RECIPE = """\
# the quickstart recipe on the tiny model, trained until stopped
extends: quickstart.yaml
model: {source: tiny}
dreambooth: {num_class_images: 2, class_image_steps: 4}
train: {steps: 100000}
validation: {seeds: [0], steps: 2, every: 100000, before_training: false}
checkpoint: {every: 100000}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 0.5):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def quickstart_text() -> str:
    """recipes/quickstart.yaml, its example data folder made absolute (the copy lives elsewhere)."""
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    return text.replace("../examples/", f"{REPO / 'examples'}/")
