"""What every benchmark records with its numbers: the machine, the date, and the JSON file under results/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def finish(result: dict, name: str, record: bool) -> None:
    """Add the machine and the date, print the result as one JSON line, and write results/NAME.json if `record`."""
    result.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))
    if record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
