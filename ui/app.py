"""The dashboard page: tabs, components and the events between them.

Reading runs, holding the preview model, processes, recipes and exports live in their own modules; the handlers
here turn their answers into component values and their errors (a user's mistake, a refused path) into gr.Error
messages. Live parts refresh on a gr.Timer and send nothing when nothing changed, so an idle page costs little.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lens_tune.errors import LensTuneError

from .export import export_run, token_source
from .paths import Folder
from .preview import BaseModel, PreviewModel, PreviewRequest
from .runs import Run, RunsIndex, compare_frame, loss_frame, metric_frame
from .train import Recipes, Trainers

PLOT = {"x": "step", "y": "value", "color": "series", "color_title": "", "height": 300}


def user_errors(handler):
    """A handler whose user-facing failures reach the page as one clear message (gr.Error), not a traceback."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (LensTuneError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapped


@dataclass
class Dashboard:
    """The page and the parts behind it (tests and the benchmark reach the parts directly)."""

    blocks: gr.Blocks
    runs: RunsIndex
    recipes: Recipes
    trainers: Trainers
    preview: PreviewModel


def build_app(runs_dir: Path, recipes_dir: Path, refresh_seconds: float = 2.0) -> Dashboard:
    runs = RunsIndex(Folder(runs_dir, "runs folder"))
    recipes = Recipes(Folder(recipes_dir, "recipes folder"))
    trainers = Trainers(runs.folder, recipes)
    preview = PreviewModel()

    def run_of(run_id: str | None) -> Run | None:
        return runs.get(run_id) if run_id else None

    # -- handlers --------------------------------------------------------------------------------------------------

    @user_errors
    def refresh_runs(known: list):
        """The runs table, and the run pickers' choices when the set of runs changed."""
        preview.release_if_memory_short()
        table = runs.table()
        ids = list(table["run"])
        pickers = [gr.skip()] * 2 if ids == known else [gr.update(choices=ids)] * 2
        return table, *pickers, ids

    def pick_from_table(event: gr.SelectData):
        run_id = event.row_value[0] if event.row_value else None
        return (gr.update(value=run_id), gr.Tabs(selected="run")) if run_id else (gr.skip(), gr.skip())

    @user_errors
    def show_run(run_id: str | None, step, seen: dict):
        """Stats, curves, samples, recipe and events of a run; nothing is sent when nothing changed since `seen`."""
        run = run_of(run_id)
        step = None if step is None else _number(step)
        if run is None:
            return "Pick a run.", *[None] * 4, gr.Slider(visible=False), [], "", "", {}
        steps = run.sample_steps()
        signature = [run.id, run.events.offset, run.state, len(steps)]
        if seen.get("signature") == signature:
            return (gr.skip(),) * 10
        follow = seen.get("run") != run.id or step is None or step >= seen.get("last_sample", math.inf)
        low, high = (steps[0], steps[-1]) if steps else (0, 0)
        step = high if follow else min(max(step, low), high)
        slider = gr.Slider(minimum=low, maximum=max(high, low + 1), step=_step_of(steps), value=step,
                           visible=bool(steps))
        return (
            run.stats(), loss_frame(run), metric_frame(run, "lr"), metric_frame(run, "grad_norm"),
            metric_frame(run, "step_time"), slider, run.samples_at(step), run.recipe_text, run.log_html(),
            {"signature": signature, "run": run.id, "last_sample": steps[-1] if steps else math.inf},
        )

    @user_errors
    def samples_at(run_id: str | None, step):
        run = run_of(run_id)
        return run.samples_at(int(_number(step or 0))) if run else []

    @user_errors
    def compare(run_ids: list[str] | None, prompt: str | None):
        """Smoothed losses of the chosen runs on one plot, and each run's newest sample of one prompt."""
        chosen = [runs.get(run_id) for run_id in run_ids or []]
        latest = {run.id: run.sample_steps()[-1] for run in chosen if run.sample_steps()}
        prompts = list(dict.fromkeys(run.prompt_of(rel) for run in chosen if run.id in latest
                                     for rel in run.events.samples[latest[run.id]]))
        prompt = prompt if prompt in prompts else (prompts[0] if prompts else None)
        gallery = []
        for run in chosen:
            match = [rel for rel in run.events.samples.get(latest.get(run.id), []) if run.prompt_of(rel) == prompt]
            if match:
                gallery.append((str(run.path / match[0]), f"{run.id} · step {latest[run.id]}"))
        return compare_frame(chosen), gr.update(choices=prompts, value=prompt), gallery

    @user_errors
    def choose_for_preview(run_id: str | None):
        """Sampling defaults from the run's recipe; releases a preview model of another base."""
        run = run_of(run_id)
        if run is None or not run.recipe:
            return (gr.skip(),) * 5
        preview.select(BaseModel.of_recipe(run.recipe))
        return _preview_defaults(run.recipe)

    @user_errors
    def adapter_choices(run_id: str | None, current: str | None, current_export: str | None):
        """What the preview can load (checkpoints, final adapter, exported files) and what can be exported."""
        run = run_of(run_id)
        adapters = run.adapters() if run else []
        exportable = [a for a in adapters if not a.startswith("export/")]
        return (gr.update(choices=adapters, value=current if current in adapters else next(iter(adapters), None)),
                gr.update(choices=exportable,
                          value=current_export if current_export in exportable else next(iter(exportable), None)))

    @user_errors
    def render_preview(run_id, adapter, prompt, negative, seed, seeds, steps, guidance, width, height, scale):
        request = PreviewRequest(str(prompt or ""), str(negative or ""), _number(seed), _number(seeds),
                                 _number(steps), _number(guidance), _number(width), _number(height), _number(scale))
        request.check()  # before touching a run, a file or the model
        run = run_of(run_id)
        if run is None or not adapter:
            raise gr.Error("Pick a run and an adapter (a checkpoint, the final adapter or an exported file) first.")
        adapter_path = runs.folder.check(run.adapter_path(adapter), f"{run.id}/{adapter}")
        return preview.render(BaseModel.of_recipe(run.recipe), adapter_path, request)

    @user_errors
    def open_recipe(name: str | None):
        """The recipe's text in the editor; a name that is not a file yet keeps the editor as it is (save as)."""
        if not name:
            return gr.skip(), "", gr.skip()
        if not recipes.path_of(name).is_file():
            return gr.skip(), f"New recipe {name}: Save writes the editor's text there.", name
        text = recipes.read(name)
        return text, _check_text(recipes.check(name, text)), name

    @user_errors
    def check_recipe(name: str | None, text: str):
        return _check_text(recipes.check(name, text)) if name else ""

    @user_errors
    def save_recipe(name: str | None, text: str):
        if not name:
            raise gr.Error("Give the recipe a file name (e.g. my-run.yaml).")
        recipes.save(name, text)
        message = f"Saved {name}.\n\n{_check_text(recipes.check(name, text))}"
        return message, gr.update(choices=recipes.names(), value=name)

    @user_errors
    def start_training(name: str | None, text: str):
        if not name:
            raise gr.Error("Pick or name a recipe first.")
        check = recipes.check(name, text)
        if not check.ok:
            raise gr.Error(f"The recipe has errors; fix them before starting:\n{check.message}")
        if not recipes.unchanged(name, text):
            recipes.save(name, text)
        preview.release()  # training needs the memory more than a preview does
        started = trainers.start(name)
        return (f"Started `lens-tune run {name}` (pid {started.process.pid}). It keeps running if you close this "
                "page or the dashboard; its run appears under Runs once its data is cached.")

    @user_errors
    def stop_training(run_id: str | None):
        run = run_of(run_id)
        if run is None:
            raise gr.Error("Pick a run first.")
        pid = trainers.stop(run)
        return f"Sent SIGINT to {run.id} (pid {pid}): it finishes its step, writes a checkpoint and stops."

    @user_errors
    def resume_training(run_id: str | None):
        run = run_of(run_id)
        if run is None:
            raise gr.Error("Pick a run first.")
        preview.release()
        started = trainers.resume(run)
        return f"Resuming {run.id} from its newest checkpoint (pid {started.process.pid})."

    @user_errors
    def export(run_id, choice, formats, repo=None, private=True):
        run = run_of(run_id)
        if run is None or not choice:
            raise gr.Error("Pick a run and a checkpoint first.")
        return export_run(run, choice, formats, repo, private)

    @user_errors
    def push(run_id, choice, formats, repo, private):
        if not str(repo or "").strip():
            raise gr.Error("Name the Hub repo: USER/REPO.")
        return export(run_id, choice, formats, repo, private)

    # -- layout ----------------------------------------------------------------------------------------------------

    with gr.Blocks(title="lens-tune dashboard", analytics_enabled=False) as app:  # no telemetry, no version check
        known_runs = gr.State([])
        seen = gr.State({})
        timer = gr.Timer(refresh_seconds)
        with gr.Row():
            gr.Markdown(f"## lens-tune\nRuns in `{runs.folder.path}` · recipes in `{recipes.folder.path}`")
            picked = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, scale=2, elem_id="lt-run")
        with gr.Tabs(selected="runs") as tabs:
            with gr.Tab("Runs", id="runs"):
                table = gr.Dataframe(headers=RunsIndex.COLUMNS, interactive=False, wrap=True, elem_id="lt-runs",
                                     label="Every run (click one to open it)")
            with gr.Tab("Run", id="run"):
                stats = gr.Markdown("Pick a run.", elem_id="lt-stats")
                with gr.Row():
                    loss_plot = gr.LinePlot(label="loss (raw and smoothed)", elem_id="lt-loss", **PLOT)
                    lr_plot = gr.LinePlot(label="learning rate", **PLOT)
                with gr.Row():
                    grad_plot = gr.LinePlot(label="grad norm", **PLOT)
                    time_plot = gr.LinePlot(label="step time (s)", **PLOT)
                sample_step = gr.Slider(0, 1, value=0, label="validation samples at step", visible=False,
                                        elem_id="lt-sample-step")
                gallery = gr.Gallery(label="validation samples", columns=6, fit_columns=False, height=280,
                                     elem_id="lt-gallery")
                with gr.Accordion("recipe (recipe.lock.yaml)", open=False):
                    recipe_view = gr.Code(language="yaml", interactive=False)
                gr.Markdown("#### events (errors in red)")
                events = gr.HTML(elem_id="lt-events")
            with gr.Tab("Compare", id="compare"):
                compared = gr.Dropdown(label="runs to compare", multiselect=True, choices=[], allow_custom_value=True,
                                       elem_id="lt-compare")
                compare_plot = gr.LinePlot(label="smoothed loss", elem_id="lt-compare-plot", **PLOT)
                compare_prompt = gr.Dropdown(label="prompt", choices=[], allow_custom_value=True)
                compare_gallery = gr.Gallery(label="newest sample of each run", columns=6, fit_columns=False,
                                             height=280, elem_id="lt-compare-gallery")
            with gr.Tab("Preview", id="preview"):
                with gr.Row():
                    adapter = gr.Dropdown(label="adapter: checkpoint, final adapter or exported file", choices=[],
                                          allow_custom_value=True, elem_id="lt-adapter")
                    scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="adapter scale")
                prompt = gr.Textbox(label="prompt", elem_id="lt-prompt")
                negative = gr.Textbox(label="negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0)
                    seeds = gr.Slider(1, 8, value=1, step=1, label="seeds (one row each)")
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                    guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="guidance")
                    width = gr.Slider(64, 2048, value=1024, step=16, label="width")
                    height = gr.Slider(64, 2048, value=1024, step=16, label="height")
                render = gr.Button("Render base and adapter", variant="primary", elem_id="lt-render")
                preview_gallery = gr.Gallery(label="base | adapter, same seed", columns=4, fit_columns=False,
                                             height=360, elem_id="lt-preview")
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    recipe_name = gr.Dropdown(label="recipe (or type a new file name)", choices=recipes.names(),
                                              allow_custom_value=True, elem_id="lt-recipe")
                    validate_button = gr.Button("Validate")
                    save_button = gr.Button("Save")
                    start_button = gr.Button("Start training", variant="primary", elem_id="lt-start")
                editor = gr.Code(language="yaml", interactive=True, lines=24, label="recipe YAML", elem_id="lt-editor")
                checked = gr.Markdown(elem_id="lt-check")
                with gr.Row():
                    stop_button = gr.Button("Stop the picked run", variant="stop", elem_id="lt-stop")
                    resume_button = gr.Button("Resume the picked run", elem_id="lt-resume")
                train_message = gr.Markdown(elem_id="lt-train-message")
                process_log = gr.Textbox(label="output of the last process started here", lines=16, max_lines=16,
                                         interactive=False, elem_id="lt-process")
            with gr.Tab("Export", id="export"):
                export_choice = gr.Dropdown(label="checkpoint", choices=[], allow_custom_value=True)
                formats = gr.CheckboxGroup(["diffusers", "comfyui"], value=[],
                                           label="formats (none ticked: every format that can carry the adapter)")
                export_button = gr.Button("Export", variant="primary")
                with gr.Row():
                    repo = gr.Textbox(label="Hub repo (USER/REPO)")
                    private = gr.Checkbox(True, label="private")
                    push_button = gr.Button("Export and push to the Hub")
                token_note = gr.Markdown(elem_id="lt-token")
                export_message = gr.Textbox(label="result", lines=4, interactive=False, elem_id="lt-export-result")

        # -- events ------------------------------------------------------------------------------------------------
        run_outputs = [stats, loss_plot, lr_plot, grad_plot, time_plot, sample_step, gallery, recipe_view, events, seen]
        live = {"show_progress": "hidden", "trigger_mode": "always_last"}  # refreshes: no spinner, no backlog
        gr.on([app.load, timer.tick], refresh_runs, known_runs, [table, picked, compared, known_runs], api_name="runs",
              **live)
        app.load(lambda: (token_source(), gr.update(choices=recipes.names())), None, [token_note, recipe_name],
                 api_visibility="private")
        table.select(pick_from_table, None, [picked, tabs], api_visibility="private")
        # preprocess=False: the sample step may lie outside the slider's last range (another run was picked); the
        # handlers clamp it to the run's sample steps themselves
        gr.on([picked.change, timer.tick], show_run, [picked, sample_step, seen], run_outputs, api_name="run",
              preprocess=False, **live)
        sample_step.release(samples_at, [picked, sample_step], gallery, api_name="samples", preprocess=False)
        picked.change(choose_for_preview, picked, [prompt, steps, guidance, width, height], api_name="defaults")
        gr.on([picked.change, adapter.focus, export_choice.focus], adapter_choices, [picked, adapter, export_choice],
              [adapter, export_choice], api_name="adapters")
        gr.on([compared.change, compare_prompt.input], compare, [compared, compare_prompt],
              [compare_plot, compare_prompt, compare_gallery], api_name="compare")
        # preprocess=False: render_preview checks every value itself and names the ones out of range
        preview_inputs = [picked, adapter, prompt, negative, seed, seeds, steps, guidance, width, height, scale]
        render.click(render_preview, preview_inputs, preview_gallery, api_name="preview", concurrency_limit=1,
                     preprocess=False)
        recipe_name.input(open_recipe, recipe_name, [editor, checked, recipe_name], api_name="recipe")
        gr.on([validate_button.click, editor.input], check_recipe, [recipe_name, editor], checked, api_name="validate",
              **live)  # checked as the text is typed
        save_button.click(save_recipe, [recipe_name, editor], [checked, recipe_name], api_name="save")
        start_button.click(start_training, [recipe_name, editor], train_message, api_name="start")
        stop_button.click(stop_training, picked, train_message, api_name="stop")
        resume_button.click(resume_training, picked, train_message, api_name="resume")
        timer.tick(trainers.output, None, process_log, api_name="process_output", **live)
        export_button.click(export, [picked, export_choice, formats], export_message, api_name="export")
        push_button.click(push, [picked, export_choice, formats, repo, private], export_message, api_name="push")
    return Dashboard(app, runs, recipes, trainers, preview)


def _step_of(steps: list[int]) -> int:
    """The slider's step: the greatest common divisor of the gaps between sample steps."""
    return functools.reduce(math.gcd, [b - a for a, b in zip(steps, steps[1:])], 0) or 1


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{value!r} is not a number") from None


def _check_text(check) -> str:
    title = "**valid**" if check.ok else "**errors** (as `lens-tune validate` reports them):"
    return f"{title}\n```\n{check.message}\n```"


def _preview_defaults(recipe: dict) -> tuple:
    """prompt, steps, guidance, width, height for a run, as its validation samples used them."""
    from lens_tune.train.samples import VARIANT_DEFAULTS

    validation = recipe.get("validation") or {}
    data = recipe.get("data") or {}
    default_steps, default_guidance = VARIANT_DEFAULTS.get((recipe.get("model") or {}).get("variant"), (20, 5.0))
    prompts = validation.get("prompts") or [""]
    prompt = prompts[0].replace("[trigger]", str(data.get("trigger") or ""))
    datasets = data.get("datasets") or [{}]
    size = (datasets[0].get("resolution") or [1024])[0]
    return (prompt, validation.get("steps") or default_steps,
            default_guidance if validation.get("guidance") is None else validation["guidance"],
            validation.get("width") or size, validation.get("height") or size)
