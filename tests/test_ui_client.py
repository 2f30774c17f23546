"""The dashboard's flows through its API (gradio_client), against a run folder made by the quickstart recipe."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_tune.train.run_folder import lock_holder, read_events, read_status
from tests.ui_support import free_port, wait_for

pytest_plugins = ["tests.ui_fixtures"]

TOKEN = "hf_uiTESTsecret0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def client(dashboard):
    from gradio_client import Client

    return Client(dashboard.url, verbose=False)


def call(client, api: str, *args):
    return client.predict(*args, api_name=f"/{api}")


def refused(client, api: str, *args) -> str:
    """The message of the gr.Error the call gets."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call(client, api, *args)
    message = str(info.value)
    assert "Traceback" not in message
    return message


def table_rows(client) -> dict[str, list]:
    table = call(client, "runs")[0]
    assert table["headers"] == ["run", "recipe", "status", "step", "ETA", "last loss", "started"]
    return {row[0]: row for row in table["data"]}


def prompts(dashboard) -> list[str]:
    """The run's validation prompts as its samples were drawn (trigger filled in)."""
    recipe = dashboard.recipe
    return [prompt.replace("[trigger]", recipe.data.trigger or "") for prompt in recipe.validation.prompts]


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.int16)


# -- runs and run detail ------------------------------------------------------------------------------------------


def test_runs_table_lists_the_quickstart_run(client, dashboard):
    rows = table_rows(client)
    row = rows[dashboard.run_id]
    events, _ = read_events(dashboard.run)
    last_loss = [e["loss"] for e in events if e["event"] == "step"][-1]
    lora = dashboard.recipe.lora
    assert row[1:4] == [f"quickstart: tiny, {lora.type} r{lora.rank}", "finished", "6 / 6"]
    assert row[4] == "" and row[5] == f"{last_loss:.4f}"
    started = datetime.strptime(dashboard.run.name, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    assert row[6] == started.astimezone().strftime("%Y-%m-%d %H:%M:%S")  # the folder's UTC time, shown in local time
    assert rows[dashboard.copy_id][2] == "finished"


def test_run_detail_has_curves_samples_recipe_and_events(client, dashboard):
    stats, loss, lr, grad, step_time, slider, gallery, recipe, log = call(client, "run", dashboard.run_id, 0)
    steps = [e for e in read_events(dashboard.run)[0] if e["event"] == "step"]
    assert "finished" in stats and "step 6 / 6" in stats and "peak memory: not measured (CPU)" in stats

    series = {}
    for step, value, name in loss["data"]:
        series.setdefault(name, []).append((step, value))
    assert [s for s, _ in series["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in series["loss"]] == pytest.approx([e["loss"] for e in steps])
    ema, expected = 0.0, []
    for n, event in enumerate(steps, start=1):  # debiased exponential moving average, weight 0.9
        ema = 0.9 * ema + 0.1 * event["loss"]
        expected.append(ema / (1 - 0.9**n))
    assert [v for _, v in series["smoothed"]] == pytest.approx(expected)
    assert [v for _, v, _ in lr["data"]] == pytest.approx([e["lr"] for e in steps])
    assert [v for _, v, _ in grad["data"]] == pytest.approx([e["grad_norm"] for e in steps])
    assert len(step_time["data"]) == 6

    assert (slider["minimum"], slider["maximum"], slider["step"], slider["value"]) == (0, 6, 3, 6)
    names = [f"p{i:02d}-seed0.png" for i in range(len(prompts(dashboard)))]
    assert [Path(item["image"]).name for item in gallery] == names
    assert {item["caption"] for item in gallery} == {f"{prompt} (seed 0)" for prompt in prompts(dashboard)}
    assert recipe.startswith("# Written by lens-tune") and "source: tiny" in recipe
    assert log.count("lt-event") == 7 and "lt-error" not in log and "name=finished" in log

    earlier = call(client, "samples", dashboard.run_id, 1)  # no samples at 1: the nearest step that has them (0)
    assert len(earlier) == len(gallery) and [item["caption"] for item in earlier] == [item["caption"] for item in gallery]
    assert not np.array_equal(pixels(earlier[0]), pixels(gallery[0]))  # six steps of training changed the sample


def test_compare_puts_runs_on_one_plot_and_their_samples_side_by_side(client, dashboard):
    plot, prompt_choice, gallery = call(client, "compare", [dashboard.run_id, dashboard.copy_id], None)
    assert {name for _, _, name in plot["data"]} == {dashboard.run_id, dashboard.copy_id}
    assert len(plot["data"]) == 12
    choices = [c[0] for c in prompt_choice["choices"]]
    assert sorted(choices) == sorted(prompts(dashboard))
    assert prompt_choice["value"] == choices[0]
    assert [item["caption"] for item in gallery] == [f"{dashboard.run_id} · step 6", f"{dashboard.copy_id} · step 6"]
    assert np.array_equal(pixels(gallery[0]), pixels(gallery[1]))  # the copy has the same samples
    _, prompt_choice, other = call(client, "compare", [dashboard.run_id, dashboard.copy_id], choices[1])
    assert prompt_choice["value"] == choices[1] and len(other) == 2
    assert not np.array_equal(pixels(other[0]), pixels(gallery[0]))


def test_a_growing_run_is_read_incrementally(client, dashboard, tmp_path):
    """Lines appended to events.jsonl show up at the next refresh; a rewritten file is read again."""
    from lens_tune.train.run_folder import RunFolder

    run = RunFolder.create(dashboard.runs, "growing")
    run.set_status("running", step=0, total_steps=100)
    run.acquire()  # this process is its trainer: alive
    try:
        for step in range(1, 4):
            run.log_event("step", step=step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, step_time=0.1)
        run_id = f"growing/{run.path.name}"
        rows = table_rows(client)
        assert rows[run_id][2:4] == ["running", "3 / 100"] and rows[run_id][4].endswith("s")
        assert len(call(client, "run", run_id, 0)[1]["data"]) == 6
        for step in range(4, 8):
            run.log_event("step", step=step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, step_time=0.1)
        assert table_rows(client)[run_id][3] == "7 / 100"
        loss = call(client, "run", run_id, 0)[1]
        assert [s for s, _, name in loss["data"] if name == "loss"] == list(range(1, 8))
        run.truncate_events_after(2)  # what a resume does: the file is replaced
        run.log_event("resume", step=2)
        assert table_rows(client)[run_id][3] == "2 / 100"
        run.log_event("error", kind="RuntimeError", message="out of memory", step=2)
        log = call(client, "run", run_id, 0)[8]
        assert '<div class="lt-error"><code>' in log and "out of memory" in log
    finally:
        run.release()
        run.set_status("interrupted", step=2, total_steps=100)
    assert table_rows(client)[run_id][2] == "interrupted"


# -- preview ------------------------------------------------------------------------------------------------------


def test_preview_renders_base_and_adapter_from_the_same_seeds(client, dashboard):
    adapters, exportable = call(client, "adapters", dashboard.run_id, None, None)
    choices = [c[0] for c in adapters["choices"]]
    assert choices[:3] == ["adapter", "checkpoints/step-000006", "checkpoints/step-000003"]
    assert adapters["value"] == "adapter" and [c[0] for c in exportable["choices"]] == choices[:3]
    prompt, steps, guidance, width, height = call(client, "defaults", dashboard.run_id)
    validation = dashboard.recipe.validation
    size = dashboard.recipe.data.datasets[0].resolution[0]
    expected_guidance = 5.0 if validation.guidance is None else validation.guidance  # "lens" variant: CFG 5
    assert (prompt, steps, guidance, width, height) == (prompts(dashboard)[0], 2, expected_guidance, size, size)

    args = [dashboard.run_id, "adapter", prompt, "", 0, 2, 2, 5.0, 64, 64, 4.0]
    images = call(client, "preview", *args)
    assert [item["caption"] for item in images] == ["seed 0 · base", "seed 0 · adapter x4", "seed 1 · base",
                                                    "seed 1 · adapter x4"]
    assert Image.open(images[0]["image"]).size == (64, 64)
    base, adapted = pixels(images[0]), pixels(images[1])
    assert np.abs(base - adapted).mean() > 1  # the adapter changes the image
    assert np.abs(base - pixels(images[2])).mean() > 1  # another seed, another image
    pipe = dashboard.dash.preview.pipe
    assert pipe is not None

    again = call(client, "preview", dashboard.run_id, "checkpoints/step-000003", prompt, "", 0, 2, 2, 5.0, 64, 64, 4.0)
    assert dashboard.dash.preview.pipe is pipe  # the model stayed loaded; only the adapter changed
    assert np.array_equal(pixels(again[0]), base)  # the same base image
    assert np.abs(pixels(again[1]) - adapted).mean() > 0.1  # another checkpoint

    call(client, "defaults", dashboard.copy_id)  # a run on the same base model: the model stays
    assert dashboard.dash.preview.pipe is pipe


def test_preview_base_is_the_plain_model(dashboard):
    """In process: the base images are exactly what the pipeline without any adapter draws from the same seeds."""
    import torch

    from lens_tune import LensPipeline
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune_ui.preview import BaseModel, PreviewRequest

    plain = LensPipeline.from_pretrained(tiny_pipeline_dir())
    expected = plain("a star", height=48, width=32, num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2,
                     generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)]).images
    preview = dashboard.dash.preview
    request = PreviewRequest("a star", seed=5, seeds=2, steps=2, width=32, height=48, scale=1.0)
    images = preview.render(BaseModel("tiny"), dashboard.run / "adapter", request)
    assert [caption for _, caption in images] == ["seed 5 · base", "seed 5 · adapter x1", "seed 6 · base",
                                                  "seed 6 · adapter x1"]
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(expected[0]))
    assert np.array_equal(np.asarray(images[2][0]), np.asarray(expected[1]))
    preview.select(BaseModel("another/model"))  # a run on another base: the model is released
    assert preview.pipe is None


@pytest.mark.parametrize(
    "size, steps, seeds, message",
    [
        ((100, 128), 2, 1, "width 100 must be a multiple of 16 between 16 and 2048"),
        ((128, 130), 2, 1, "height 130 must be a multiple of 16"),
        ((128, 128), 0, 1, "steps 0 must be between 1 and 200"),
        ((128, 128), 10_000, 1, "steps 10000 must be between 1 and 200"),
        ((128, 128), 2, 1000, "number of seeds 1000 must be between 1 and 8"),
        ((4096, 4096), 2, 1, "width 4096 must be a multiple of 16 between 16 and 2048"),
    ],
)
def test_preview_refuses_out_of_range_values_with_a_message(client, dashboard, size, steps, seeds, message):
    text = refused(client, "preview", dashboard.run_id, "adapter", "a robot", "", 0, seeds, steps, 5.0, *size, 1.0)
    assert message in text


# -- paths --------------------------------------------------------------------------------------------------------


def test_no_input_reaches_outside_the_runs_and_recipes_folders(client, dashboard, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text("model: {source: tiny}\n")
    fake_run = outside / "20200101-000000"
    fake_run.mkdir()
    (fake_run / "events.jsonl").write_text('{"event": "step", "time": 1, "step": 1, "loss": 0.5}\n')
    (dashboard.runs / "linked").symlink_to(outside)  # a run name that leads outside
    (dashboard.recipes / "linked.yaml").symlink_to(outside / "secret.yaml")
    try:
        assert not [r for r in table_rows(client) if r.startswith("linked/")]  # not listed
        for run_id in ["../outside", "/etc", str(dashboard.run), "linked/20200101-000000", "quickstart/../../x",
                       f"{dashboard.run_id}/../../../..", "~/runs"]:
            message = refused(client, "run", run_id, 0)
            assert "outside the runs folder" in message or "relative to the runs folder" in message, message
        for api in ("stop", "resume"):
            assert "outside the runs folder" in refused(client, api, "linked/20200101-000000")
        for name in ["../evil.yaml", "/tmp/evil.yaml", "sub/evil.yaml", "linked.yaml", ".hidden.yaml", "notes.txt"]:
            message = refused(client, "save", name, "model: {source: tiny}\n")
            assert "recipes folder" in message or "not a recipe name" in message, message
        assert (outside / "secret.yaml").read_text() == "model: {source: tiny}\n"
        assert not (dashboard.root / "evil.yaml").exists()
        assert "recipes folder" in refused(client, "recipe", "linked.yaml")
        extends_outside = f"extends: {outside / 'secret.yaml'}\n"
        assert "outside the recipes folder" in call(client, "validate", "x.yaml", extends_outside)
        message = refused(client, "preview", dashboard.run_id, "../../../../../etc/passwd", "a robot", "", 0, 1, 2, 5.0,
                          64, 64, 1.0)
        assert "is not an adapter" in message
        assert "is an exported file already" in refused(client, "export", dashboard.run_id, "export/x.safetensors", [])
        assert "is not an adapter" in refused(client, "export", dashboard.run_id, "../../..", [])
        # Gradio's own file route serves the runs folder only, symlinks resolved
        linked_events = dashboard.runs / "linked" / "20200101-000000" / "events.jsonl"
        for path in ["/etc/passwd", str(outside / "secret.yaml"), str(linked_events)]:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{dashboard.url}gradio_api/file={path}")
            assert info.value.code in (403, 404)
    finally:
        (dashboard.runs / "linked").unlink()
        (dashboard.recipes / "linked.yaml").unlink()


# -- recipes and training -----------------------------------------------------------------------------------------


def test_validation_messages_are_those_of_lens_tune_validate(client, dashboard, monkeypatch, capsys):
    from lens_tune.cli import main

    bad = "model: {source: tiny}\ndata:\n  datasets: []\ntrain:\n  optimizer: adam\n  steps: 0\n"
    shown = call(client, "validate", "bad.yaml", bad)
    assert not (dashboard.recipes / "bad.yaml").exists()  # validating does not save
    (dashboard.root / "bad.yaml").write_text(bad)
    monkeypatch.chdir(dashboard.root)
    assert main(["validate", "bad.yaml"]) == 2
    printed = capsys.readouterr().err.splitlines()[0].removeprefix("lens-tune validate: error: ")
    assert shown.startswith("**errors**") and printed in shown
    assert "bad.yaml:5:14: train.optimizer: Input should be one of" in shown and "did you mean 'adamw'?" in shown
    assert "bad.yaml:6:10: train.steps" in shown

    text, check, _ = call(client, "recipe", "quickstart.yaml")
    saved = (dashboard.recipes / "quickstart.yaml").read_text()
    assert text == saved.strip()  # the editor shows the file without surrounding blank lines
    assert check.startswith("**valid**") and "OK: quickstart.yaml" in check and "subject dataset" in check
    message, choices = call(client, "save", "copy.yaml", text)
    assert "Saved copy.yaml" in message and (dashboard.recipes / "copy.yaml").read_text() == saved
    assert "copy.yaml" in [c[0] for c in choices["choices"]]
    assert "The recipe has errors" in refused(client, "start", "bad.yaml", bad)
    assert not (dashboard.recipes / "bad.yaml").exists()
    (dashboard.recipes / "copy.yaml").unlink()


def test_start_stop_and_resume_a_training(client, dashboard):
    """Start long.yaml from the Train tab's API, see it run, stop it (checkpoint, interrupted), resume it, stop it."""
    text = call(client, "recipe", "long.yaml")[0]
    message = call(client, "start", "long.yaml", text)
    process = dashboard.dash.trainers.started[-1].process
    assert f"pid {process.pid}" in message
    assert os.getsid(process.pid) == process.pid != os.getsid(0)  # its own session: it outlives the dashboard

    def training():  # the table row of the run whose trainer is that process, once it has done a step
        rows = table_rows(client)
        mine = [rows[run_id] for run_id in rows if lock_holder(dashboard.runs / run_id) == process.pid]
        return mine and mine[0][2] == "running" and int(mine[0][3].split(" / ")[0]) >= 1 and mine[0]

    row = wait_for(training, 180, "the started run to train")
    run_id, run = row[0], dashboard.runs / row[0]
    assert row[3].endswith("/ 100000") and row[4]  # an ETA
    assert "training" in call(client, "process_output")

    assert f"pid {process.pid}" in call(client, "stop", run_id)
    wait_for(lambda: table_rows(client)[run_id][2] == "interrupted", 120, "the stopped run to be interrupted")
    assert process.wait(timeout=60) == 130
    status = read_status(run)
    assert status["state"] == "interrupted" and (run / "checkpoints" / f"step-{status['step']:06d}").is_dir()
    assert "is not training" in refused(client, "stop", run_id)

    message = call(client, "resume", run_id)
    resumed = dashboard.dash.trainers.started[-1].process
    assert f"pid {resumed.pid}" in message and resumed.pid != process.pid
    wait_for(lambda: any(e["event"] == "resume" for e in read_events(run)[0]) and
             table_rows(client)[run_id][2] == "running", 180, "the resumed run to train")
    assert "is training now" in refused(client, "resume", run_id)
    call(client, "stop", run_id)
    assert resumed.wait(timeout=120) == 130
    assert read_status(run)["state"] == "interrupted" and read_status(run)["step"] >= status["step"]


# -- export and the Hub -------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HF_TOKEN set, no saved login, the Hub client pointed at a loopback fake Hub."""
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"), raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


def test_export_a_checkpoint(client, dashboard):
    message = call(client, "export", dashboard.run_id, "checkpoints/step-000003", ["comfyui"])
    assert message.startswith(f"Exported to {dashboard.run_id}/export/step-000003: ")
    assert "lens_comfyui.safetensors" in message and "pytorch_lora_weights" not in message.splitlines()[0]
    assert (dashboard.run / "export" / "step-000003" / "lens_comfyui.safetensors").is_file()


def test_push_to_the_hub_with_the_token_from_the_environment(client, dashboard, fake_hub, monkeypatch):
    from lens_tune_ui.export import token_source

    assert token_source() == "Hub token: from the HF_TOKEN environment variable."
    message = call(client, "push", dashboard.run_id, "adapter", [], "me/robot-lora", True)
    assert "pushed to me/robot-lora" in message and TOKEN not in message
    assert [c["repo"] for c in fake_hub.commits] == ["me/robot-lora"] and fake_hub.repos["me/robot-lora"]["private"]
    local = dashboard.run / "export" / "step-000006"
    weights = "pytorch_lora_weights.safetensors"
    assert fake_hub.files[weights] == (local / weights).read_bytes()
    assert all(f"Bearer {TOKEN}" == a for a in fake_hub.authorizations)
    assert "USER/REPO" in refused(client, "push", dashboard.run_id, "adapter", [], "  ", True)

    monkeypatch.delenv("HF_TOKEN")
    assert "Hub token: none found" in token_source()
    message = refused(client, "push", dashboard.run_id, "adapter", [], "me/x", True)
    assert "no Hugging Face token: set HF_TOKEN" in message
    config = urllib.request.urlopen(f"{dashboard.url}config").read().decode()
    assert TOKEN not in config and not [c for c in json.loads(config)["components"]
                                        if "token" in str(c.get("props", {}).get("label", "")).lower()]


# -- serving ------------------------------------------------------------------------------------------------------


def test_auth_is_asked_for(dashboard):
    from gradio_client import Client

    from lens_tune_ui import launch

    dash, url = launch(dashboard.runs, dashboard.recipes, port=free_port(), auth="ann:s3cret", block=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}config")
        assert info.value.code == 401
        rows = Client(url, auth=("ann", "s3cret"), verbose=False).predict(api_name="/runs")[0]["data"]
        assert dashboard.run_id in [row[0] for row in rows]
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
    finally:
        dash.blocks.close()
