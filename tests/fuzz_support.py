"""What the fuzz tests (tests/test_fuzz_*.py) share: hypothesis profiles, a per-case time limit, the in-process CLI
runner and the case counts written to tests/artifacts/.

Profiles: "fuzz" (the default: modest counts, derandomized so CI runs the same cases every time) and "soak"
(LENS_TUNE_SOAK=1: 2000 examples per test with a fresh random seed). LENS_TUNE_FUZZ_SEED=N runs with seed N
instead (it replays a soak run). The seed is written with the counts and shown in pytest's warnings summary, and
hypothesis prints how to reproduce a failing case.
No example database is kept, and hypothesis' own files go to a temporary folder, so no .hypothesis/ is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, seed, settings
from hypothesis.configuration import set_hypothesis_home_dir

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

_home = tempfile.mkdtemp(prefix="lens-tune-hypothesis-")
atexit.register(shutil.rmtree, _home, ignore_errors=True)
set_hypothesis_home_dir(_home)  # the unicode tables hypothesis caches go here, not into ./.hypothesis

SOAK = os.environ.get("LENS_TUNE_SOAK", "") not in ("", "0")
_seed_text = os.environ.get("LENS_TUNE_FUZZ_SEED", "").strip()
SEED: int | None = int(_seed_text) if _seed_text else (random.SystemRandom().randrange(2**32) if SOAK else None)
MODE = "soak" if SOAK else "default"
DEFAULT_EXAMPLES = 150
SOAK_EXAMPLES = 2000

_common = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("fuzz", max_examples=DEFAULT_EXAMPLES, derandomize=SEED is None, **_common)
settings.register_profile("soak", max_examples=SOAK_EXAMPLES, derandomize=SEED is None, **_common)
PROFILE = "soak" if SOAK else "fuzz"


class FuzzSeed(UserWarning):
    """Says which seed a soak run used: pytest lists warnings in its summary even when every test passes."""


if SEED is not None:
    warnings.warn(FuzzSeed(f"fuzz tests ran with seed {SEED}; LENS_TUNE_FUZZ_SEED={SEED} runs the same cases"))


def fuzz(examples: int = DEFAULT_EXAMPLES):
    """Decorator for a @given function: the profile's settings; `examples` scales the count (default: 150, soak 2000)."""
    count = examples if not SOAK else max(1, round(examples * SOAK_EXAMPLES / DEFAULT_EXAMPLES))

    def wrap(test):
        test = settings(settings.get_profile(PROFILE), max_examples=count)(test)
        return seed(SEED)(test) if SEED is not None else test

    return wrap


class Hang(BaseException):
    """A case ran past its time limit (BaseException: code under test cannot swallow it with `except Exception`)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    def on_alarm(signum, frame):
        raise Hang(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Let this process allocate at most `extra_bytes` more (RLIMIT_DATA): a blow-up is a MemoryError, not swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    used = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmData:"))
    limit = used + extra_bytes if hard == resource.RLIM_INFINITY else min(used + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def run_cli(argv: list[str], seconds: float = 30, memory: int = 2 * 2**30) -> tuple[int, str, str]:
    """`lens_tune.cli.main(argv)` in-process -> (status, stdout, stderr), within `seconds` and `memory` bytes more.

    stdout and stderr are strict UTF-8 streams, as on a UTF-8 terminal, so text that cannot be printed fails here
    as it would for a user. Any exception that escapes main() (a traceback for the user) propagates to the test.
    """
    from lens_tune.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    with time_limit(seconds, f"lens-tune {' '.join(argv)[:200]}"), memory_limit(memory):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_info:  # argparse
                code = exit_info.code
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def assert_one_error(code: int, out: str, err: str, command: str) -> None:
    """Status 0, or status 2 with exactly one `lens-tune COMMAND: error:` message; never a traceback."""
    assert code in (0, 2), f"status {code}\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    if code == 2:
        # `run` may first say how to go on ("Stopped; ... run again"); the error itself is one message
        assert err.startswith(f"lens-tune {command}: error: ") or (
            command == "run" and f"\nlens-tune {command}: error: " in err
        ), err[-3000:]
        assert err.count(f"lens-tune {command}: error:") == 1, err[-3000:]
        assert "OK:" not in out


class Cases:
    """Counts the cases a test ran, by outcome; `record()` adds them to tests/artifacts/fuzz-cases-<mode>.json."""

    def __init__(self, test: str):
        self.test = test
        self.outcomes: Counter[str] = Counter()
        self.started = time.monotonic()

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def record(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"fuzz-cases-{MODE}.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = {}
        tests = report.get("tests", {})
        tests[self.test] = {
            "cases": self.total,
            "seed": SEED if SEED is not None else "derandomized",
            "outcomes": dict(sorted(self.outcomes.items())),
            "seconds": round(time.monotonic() - self.started, 2),
        }
        report = {
            "mode": MODE,
            "seed": SEED if SEED is not None else "derandomized",
            "examples_per_test": f"up to {SOAK_EXAMPLES if SOAK else DEFAULT_EXAMPLES} (some tests fewer: see cases)",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_cases": sum(entry["cases"] for entry in tests.values()),
            "tests": dict(sorted(tests.items())),
        }
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
