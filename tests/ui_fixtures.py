"""Fixtures of the dashboard tests, loaded with `pytest_plugins = ["tests.ui_fixtures"]` so that every dashboard
test module shares one trained quickstart run and one running dashboard per session.

- `ui_folders`: a runs folder with the quickstart recipe trained on the tiny model for 6 steps (samples at 0, 3, 6;
  checkpoints at 3 and 6) plus a copy of that run under another name, and a recipes folder with quickstart.yaml and
  long.yaml (100,000 steps: it runs until stopped); `recipe` is the run's resolved recipe.
- `dashboard`: the dashboard serving those folders on a free loopback port, refreshing every second.
"""

from __future__ import annotations

import os
import shutil
import signal
from types import SimpleNamespace

import pytest

from tests.ui_support import FAST, LONG_RECIPE, free_port, quickstart_text

# the quickstart recipe, shortened: 6 steps, samples at 0, 3 and 6, checkpoints at 3 and 6
QUICK = [*FAST, "train.steps=6", "validation.every=3", "checkpoint.every=3", "output.name=quickstart"]
COPY_ID = "quickstart-copy/20200101-000000"


@pytest.fixture(scope="session")
def ui_folders(tmp_path_factory, isolated_cache):
    import torch

    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe
    from lens_tune.train.loop import train

    root = tmp_path_factory.mktemp("dashboard")
    recipes, runs = root / "recipes", root / "runs"
    recipes.mkdir()
    (recipes / "quickstart.yaml").write_text(quickstart_text())
    (recipes / "long.yaml").write_text(LONG_RECIPE)
    recipe = load_recipe(recipes / "quickstart.yaml", Recipe, [*QUICK, f"output.dir={runs}"])
    result = train(recipe, device=torch.device("cpu"), log=lambda *_: None)
    assert result.state == "finished" and result.step == 6
    shutil.copytree(result.run, runs / COPY_ID)
    return SimpleNamespace(root=root, runs=runs, recipes=recipes, run=result.run, recipe=recipe,
                           run_id=f"quickstart/{result.run.name}", copy_id=COPY_ID)


@pytest.fixture(scope="session")
def dashboard(ui_folders):
    from lens_tune_ui import launch

    dash, url = launch(ui_folders.runs, ui_folders.recipes, port=free_port(), block=False, refresh_seconds=1.0)
    yield SimpleNamespace(dash=dash, url=url, **vars(ui_folders))
    for started in dash.trainers.started:  # a test that failed half-way may leave a trainer running
        if started.process.poll() is None:
            os.killpg(started.process.pid, signal.SIGKILL)
            started.process.wait(timeout=30)
    dash.blocks.close()

