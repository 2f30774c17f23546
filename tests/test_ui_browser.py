"""The dashboard in a real headless Chromium (Playwright), against a run folder made by the quickstart recipe.

Each tab is screenshotted into tests/artifacts/ui/ (ignored by git; docs/images/ui/ holds committed copies). Without
Chromium or the playwright package the module is skipped, and pytest -ra says why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lens_tune.train.run_folder import lock_holder
from tests.ui_support import REPO, wait_for

pytest_plugins = ["tests.ui_fixtures"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "tests" / "artifacts" / "ui"


def missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"Chromium is not installed ({CHROMIUM} is missing; apt-get install -y chromium)"
    return ""


MISSING = missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"browser tests skipped: {MISSING}")


@pytest.fixture(scope="module")
def page(dashboard):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)  # test output: tests/artifacts/ is ignored by git
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(dashboard.url)
        yield page
        browser.close()


def shoot(page, name: str) -> None:
    page.wait_for_timeout(500)  # let the last refresh settle
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    wait_for(lambda: tab_is_open(page, name), 30, f"the {name} tab to open")


def tab_is_open(page, name: str) -> bool:
    return page.get_by_role("tab", name=name, exact=True).get_attribute("aria-selected") == "true"


def cell(page, text: str):
    return page.locator("#lt-runs").get_by_text(text, exact=True).filter(visible=True).first


def row_status(page, run_id: str) -> str:
    row = page.locator("#lt-runs").get_by_role("row").filter(has_text=run_id).first
    return row.get_by_role("gridcell").nth(2).inner_text().strip()


def line_points(page, plot: str) -> list[int]:
    """Points drawn by each line of a Vega plot (its SVG paths: M x,y then L x,y per further point)."""
    paths = page.locator(f"{plot} g.mark-line path")
    return [len(re.findall(r"[ML]", paths.nth(i).get_attribute("d") or "")) for i in range(paths.count())]


def loaded_images(page, selector: str) -> int:
    script = "(images) => images.filter(i => i.complete && i.naturalWidth > 0).length"
    return page.locator(selector).evaluate_all(script)


def test_runs_tab_lists_the_quickstart_run(page, dashboard):
    cell(page, dashboard.run_id).wait_for()
    assert row_status(page, dashboard.run_id) == "finished"
    shoot(page, "runs")


def test_run_tab_draws_the_loss_curve_and_the_samples(page, dashboard):
    cell(page, dashboard.run_id).click()  # opens the Run tab on it
    wait_for(lambda: line_points(page, "#lt-loss") == [6, 6], 60, "the loss and smoothed curves with 6 points each")
    assert line_points(page, "#lt-loss") == [6, 6]
    wait_for(lambda: loaded_images(page, "#lt-gallery img") >= 2, 60, "the validation samples")
    assert "finished · step 6 / 6" in page.locator("#lt-stats").inner_text()
    shoot(page, "run")


def test_compare_tab_plots_two_runs(page, dashboard):
    open_tab(page, "Compare")
    for run_id in (dashboard.run_id, dashboard.copy_id):
        page.locator("#lt-compare input").click()
        page.get_by_role("option", name=run_id, exact=True).click()
    page.locator("#lt-compare-plot").click()  # close the list
    wait_for(lambda: line_points(page, "#lt-compare-plot") == [6, 6], 60, "two runs' curves")
    wait_for(lambda: loaded_images(page, "#lt-compare-gallery img") >= 2, 60, "a sample of each run")
    shoot(page, "compare")


def test_preview_tab_renders_base_and_adapter(page):
    open_tab(page, "Preview")
    wait_for(lambda: page.locator("#lt-prompt textarea").input_value(), 30, "the run's prompt")
    page.locator("#lt-render").click()
    wait_for(lambda: loaded_images(page, "#lt-preview img") >= 2, 180, "the base and adapter images")
    assert page.locator("#lt-preview").get_by_text("seed 0 · base").count() >= 1
    shoot(page, "preview")


def test_export_tab_never_shows_a_token(page):
    open_tab(page, "Export")
    page.locator("#lt-token").get_by_text("Hub token:").wait_for()
    assert page.get_by_label("token").count() == 0  # no field to type one
    shoot(page, "export")


def test_train_tab_starts_a_run_that_can_be_stopped(page, dashboard):
    open_tab(page, "Train")
    page.locator("#lt-recipe input").click()
    page.get_by_role("option", name="long.yaml", exact=True).click()
    wait_for(lambda: "steps: 100000" in page.locator("#lt-editor").inner_text(), 30, "the recipe in the editor")
    page.locator("#lt-check").get_by_text("OK: long.yaml").wait_for()
    before = len(dashboard.dash.trainers.started)
    page.locator("#lt-start").click()
    page.locator("#lt-train-message").get_by_text("Started").wait_for()
    started = dashboard.dash.trainers.started[before:]
    assert len(started) == 1

    def running_run():  # the run folder whose trainer is the process just started
        runs = [r for r in dashboard.dash.runs.refresh() if lock_holder(r.path) == started[0].process.pid]
        return runs[0].id if runs and runs[0].state == "running" else None

    run_id = wait_for(running_run, 180, "the new run to start training")
    open_tab(page, "Runs")
    wait_for(lambda: cell(page, run_id).is_visible() and row_status(page, run_id) == "running", 30,
             "the new run in the table, running")
    cell(page, run_id).click()
    # choosing a run opens the Run tab once the server answers; under load that can come after a click on Train
    wait_for(lambda: tab_is_open(page, "Run"), 30, "the chosen run's tab")
    open_tab(page, "Train")
    wait_for(lambda: "training" in page.locator("#lt-process textarea").input_value(), 30, "the trainer's output")
    shoot(page, "train")
    page.locator("#lt-stop").click()
    page.locator("#lt-train-message").get_by_text("Sent SIGINT").wait_for()
    open_tab(page, "Runs")
    wait_for(lambda: row_status(page, run_id) == "interrupted", 120, "the stopped run to show as interrupted")
    assert started[0].process.wait(timeout=60) == 130
