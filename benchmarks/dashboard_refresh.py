"""How long a dashboard refresh takes for a run of 1,000 and of 100,000 steps.

For each size, a run folder is written as the trainer writes one (a step line per step, samples every 250 steps,
checkpoints every 500). A refresh is what the page's timer asks for every 2 seconds: the runs table (/runs) and the
picked run's curves, stats, samples and events (/run). Three cases:

- first load: a fresh dashboard reads the whole events.jsonl;
- refresh: 10 steps were appended since the last refresh (a run training between two ticks);
- idle refresh: nothing changed (the page gets nothing to redraw).

Each is timed twice: the page's handlers called in process (the dashboard's own work), and over HTTP through the
page's API with gradio_client from a fresh dashboard (what the browser waits for, Gradio's queue included; two
requests to an endpoint that does nothing show that part alone). For
reference, parsing the whole file again is timed too: what every refresh would cost without the kept byte offsets
and arrays. The promise: a refresh costs the same for 100,000 steps as for 1,000.

    .venv/bin/python benchmarks/dashboard_refresh.py                 # records results/dashboard_refresh.json
    .venv/bin/python benchmarks/dashboard_refresh.py --steps 200 2000 --refreshes 3 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

RESULTS_JSON = Path(__file__).parent / "results" / "dashboard_refresh.json"
NEW_STEPS = 10  # appended between two refreshes


def log_steps(run, first: int, last: int) -> None:
    for step in range(first, last + 1):
        run.log_event("step", step=step, loss=0.5 + 0.1 / step, lr=1e-4, grad_norm=0.25, step_time=0.41,
                      samples_per_s=2.4, peak_memory_gib=None)
        if step % 250 == 0:
            run.log_event("sample", step=step, images=[f"samples/step-{step:06d}/p00-seed0.png"])
        if step % 500 == 0:
            run.log_event("checkpoint", step=step, path=f"checkpoints/step-{step:06d}", final=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def milliseconds(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def handlers(dashboard) -> dict:
    """The page's event handlers by API name, to call them in process."""
    return {fn.api_name: fn.fn for fn in dashboard.blocks.fns.values() if fn.api_name}


def measure(steps: int, refreshes: int, root: Path) -> dict:
    from gradio_client import Client

    from lens_tune.train.run_folder import RunFolder
    from lens_tune_ui import launch
    from lens_tune_ui.app import build_app
    from lens_tune_ui.runs import RunEvents

    runs = root / f"runs-{steps}"
    run = RunFolder.create(runs, "bench")
    run.set_status("running", step=0, total_steps=10 * steps)
    run.acquire()  # this process is the run's trainer: it shows as running
    log_steps(run, 1, steps)
    run_id = f"bench/{run.path.name}"
    last = steps
    result = {"steps": steps, "events_mib": round(run.events_path.stat().st_size / 2**20, 2)}

    # in process: the handlers' own work (reading, curves, table), as one timer tick runs them
    page = handlers(build_app(runs, root))
    state = {"known": [], "seen": {}}

    def tick() -> float:
        started = time.perf_counter()
        *_, state["known"] = page["runs"](state["known"])
        *_, state["seen"] = page["run"](run_id, None, state["seen"])
        return milliseconds(started)

    result["handlers_first_load_ms"] = tick()
    busy, idle = [], []
    for _ in range(refreshes):
        log_steps(run, last + 1, last + NEW_STEPS)
        last += NEW_STEPS
        busy.append(tick())
        idle.append(tick())
    result["handlers_refresh_ms_median"] = round(statistics.median(busy), 2)
    result["handlers_idle_refresh_ms_median"] = round(statistics.median(idle), 2)

    # over HTTP, through the page's API, from a fresh dashboard (what the browser waits for)
    dashboard, url = launch(runs, root, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)

        def request() -> float:
            started = time.perf_counter()
            table = client.predict(api_name="/runs")[0]
            client.predict(run_id, 0, api_name="/run")
            assert table["data"][0][0] == run_id
            return milliseconds(started)

        result["http_first_load_ms"] = request()
        busy, idle = [], []
        for _ in range(refreshes):
            log_steps(run, last + 1, last + NEW_STEPS)
            last += NEW_STEPS
            busy.append(request())
            idle.append(request())
        result["http_refresh_ms_median"] = round(statistics.median(busy), 2)
        result["http_idle_refresh_ms_median"] = round(statistics.median(idle), 2)
        # Gradio's own cost of two round trips through its queue (an endpoint that does next to nothing, twice)
        baseline = []
        for _ in range(refreshes):
            started = time.perf_counter()
            client.predict(api_name="/process_output")
            client.predict(api_name="/process_output")
            baseline.append(milliseconds(started))
        result["http_two_empty_requests_ms_median"] = round(statistics.median(baseline), 2)
        assert dashboard.runs.get(run_id).step == last
    finally:
        dashboard.blocks.close()

    # for reference: parsing the whole file again, what every refresh would cost without the byte offsets
    started = time.perf_counter()
    RunEvents(run.events_path).update()
    result["full_reread_ms"] = milliseconds(started)
    run.release()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--refreshes", type=int, default=20)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        measured = [measure(steps, args.refreshes, Path(folder)) for steps in args.steps]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "new_steps_per_refresh": NEW_STEPS,
        "refreshes": args.refreshes,
        "runs": measured,
    }
    print(json.dumps(result, indent=2))
    if not args.no_record:
        RESULTS_JSON.parent.mkdir(exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
