"""The `lens-tune` command: one thin subcommand per verb. Logic lives in the layers; this file parses and reports.

User mistakes (LensTuneError, bad arguments) print one line and a hint and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lens_tune.errors import LensTuneError
from lens_tune.files import DiskFullError
from lens_tune.logs import quiet_bitsandbytes_notice

MAX_STEPS = 1000
MAX_IMAGES = 64


class UsageError(LensTuneError):
    """A command-line argument is out of range."""


def _positive_multiple_of_16(text: str) -> int:
    value = int(text)
    if value <= 0 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16 (Lens works on 16-pixel tokens)")
    return value


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def add_recipe_arguments(command: argparse.ArgumentParser, help_text: str, optional: bool = False) -> None:
    command.add_argument("recipe", type=Path, nargs="?" if optional else None, help=help_text)
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.steps=500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-tune",
        description="LoRA/DreamBooth fine-tuning for Microsoft's Lens text-to-image model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sample = commands.add_parser(
        "sample",
        help="generate images with Lens (optionally with a LoRA adapter)",
        description="Generate images and write them as PNGs with their settings in the PNG metadata.",
    )
    sample.add_argument(
        "--model",
        required=True,
        help="a local pipeline folder, a Hub repo id (owner/name), or 'tiny' for the built-in tiny random model",
    )
    sample.add_argument("--revision", help="Hub branch, tag or commit of --model")
    sample.add_argument("--prompt", required=True, help="what to draw")
    sample.add_argument("--negative", default="", help="negative prompt (default: none)")
    sample.add_argument("--adapter", type=Path, help="an adapter file or folder: diffusers/PEFT, ComfyUI or kohya layout; "
                        "LoRA, DoRA, LoHa or LoKr")
    sample.add_argument("--adapter-scale", type=float, default=1.0, help="strength of --adapter (default 1.0)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0); image i uses the same generator")
    sample.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=20, help="sampling steps (default 20)")
    sample.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    sample.add_argument("--width", type=_positive_multiple_of_16, help="image width, multiple of 16 (default 1024; 128 for tiny)")
    sample.add_argument("--height", type=_positive_multiple_of_16, help="image height, multiple of 16 (default 1024; 128 for tiny)")
    sample.add_argument("--num-images", type=_int_in(1, MAX_IMAGES), default=1, help="images to generate (default 1)")
    sample.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    sample.add_argument("--dtype", choices=["bf16", "fp32"], help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    sample.add_argument("--cpu-offload", action="store_true", help="keep only the running component on the GPU (16 GB cards)")
    sample.add_argument("--out", type=Path, required=True, help="folder to write the PNGs to")
    sample.set_defaults(handler=run_sample)

    validate = commands.add_parser(
        "validate",
        help="check a recipe and print every resolved setting (loads no weights)",
        description="Load a recipe (with extends and overrides), check it and its data sources, print the resolved "
        "recipe. Loads no model weights.",
    )
    add_recipe_arguments(validate, "the recipe YAML (optional with --explain)", optional=True)
    validate.add_argument("--explain", action="store_true", help="list every recipe field with its default and meaning")
    validate.set_defaults(handler=run_validate)

    cache = commands.add_parser(
        "cache",
        help="run only the data phases of a recipe: check images, class images, text features, latents",
        description="Check the images, generate missing class images, and fill the text-feature and latent caches. "
        "Unchanged items are reused from earlier runs.",
    )
    add_recipe_arguments(cache, "the recipe YAML")
    cache.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    cache.set_defaults(handler=run_cache)

    run = commands.add_parser(
        "run",
        help="train a LoRA adapter from a recipe (caches, class images, training, samples, checkpoints)",
        description="Train an adapter as the recipe says. Ctrl-C finishes the current step, writes a checkpoint and "
        "prints the command that resumes.",
    )
    add_recipe_arguments(run, "the recipe YAML (or a run's recipe.lock.yaml)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                     help="continue a run: its folder or one of its checkpoints (alone: the newest run of this recipe)")
    run.add_argument("--num-processes", type=_int_in(1, 64), default=1,
                     help="data-parallel processes through `accelerate launch` (default 1)")
    run.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu forces CPU training (default auto)")
    run.add_argument("--force", action="store_true",
                     help="train even if the memory plan says the GPU is too small (see `lens-tune plan`)")
    run.set_defaults(handler=run_training)

    plan = commands.add_parser(
        "plan",
        help="predict the peak memory of every phase of a recipe and whether it fits the GPU (loads no weights)",
        description="Predict the peak GPU memory of each phase (text-feature caching, class images, latent caching, "
        "a training step at the largest bucket, validation samples) from the recipe and the model config, say "
        "whether each fits the budget (--vram, or the detected GPU), and the cheapest recipe changes that make "
        "training fit. No weights are loaded.",
    )
    add_recipe_arguments(plan, "the recipe YAML")
    plan.add_argument("--vram", metavar="SIZE", help="the GPU memory to plan for, e.g. 16GiB, 16GB, 12000MiB "
                      "(default: the detected GPU)")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="plan a GPU run (default) or a CPU run (host memory, no budget)")
    plan.add_argument("--text-tokens", type=_int_in(1, 512), help="caption feature length to plan for (default 128)")
    plan.set_defaults(handler=run_plan)

    merge = commands.add_parser(
        "merge",
        help="bake an adapter into the transformer and save a full diffusers-layout transformer",
        description="Merge an adapter into the base transformer at a given strength and save it (sharded "
        "safetensors), loadable with LensTransformer2DModel.from_pretrained without adapter code.",
    )
    merge.add_argument("adapter", type=Path, help="a run folder (its final adapter), one of its checkpoints, or an adapter folder")
    merge.add_argument("--model", required=True, help="the base model: 'tiny', a Lens folder or a Hub repo id")
    merge.add_argument("--revision", help="Hub branch, tag or commit of --model")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged transformer")
    merge.add_argument("--scale", type=float, default=1.0, help="adapter strength to bake in (default 1.0)")
    merge.set_defaults(handler=run_merge)

    export = commands.add_parser(
        "export",
        help="write a run's adapter for diffusers/PEFT and ComfyUI, with a model card; optionally push to the Hub",
        description="Export the final adapter of a run (or one of its checkpoints) as files other tools load, with "
        "training metadata in each file and a README.md model card. The Hub token comes from HF_TOKEN or your saved "
        "login and is never printed or written.",
    )
    export.add_argument("path", type=Path, help="a run folder or one of its checkpoints")
    export.add_argument("--format", help="comma-separated: diffusers, comfyui (default: every format that can carry "
                        "the adapter: both for LoRA, diffusers for DoRA, comfyui for LoKr/LoHa)")
    export.add_argument("--out", type=Path, help="export folder (default RUN/export/step-XXXXXX)")
    export.add_argument("--push-to-hub", metavar="USER/REPO", help="also upload the export folder to this Hub repo")
    export.add_argument("--private", action="store_true", help="create the Hub repo private")
    export.add_argument("--revision", help="Hub branch to push to (default main)")
    export.set_defaults(handler=run_export)

    ui = commands.add_parser(
        "ui",
        help="open the dashboard: runs, live loss, samples, previews, training and export in a web page",
        description="Serve the Gradio dashboard. It reads the run folders under --runs and the recipes under "
        "--recipes (and writes only there). It listens on 127.0.0.1; --share or another --host needs --auth.",
    )
    ui.add_argument("--runs", type=Path, default=Path("runs"), help="the runs folder (default ./runs)")
    ui.add_argument("--recipes", type=Path, default=Path("recipes"), help="the recipes folder (default ./recipes)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=_int_in(1, 65535), default=7860, help="port (default 7860)")
    ui.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth)")
    ui.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    ui.set_defaults(handler=run_ui)
    return parser


def run_ui(args: argparse.Namespace) -> None:
    from lens_tune_ui import launch  # imported here: gradio takes seconds to import, other commands never need it

    launch(args.runs, args.recipes, args.host, args.port, args.share, args.auth)


def run_export(args: argparse.Namespace) -> None:
    from lens_tune.export.export import export_adapter

    formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else None
    out = export_adapter(args.path, formats, args.out, args.push_to_hub, args.private, args.revision)
    print(f"Exported to {out.resolve()}")


def run_merge(args: argparse.Namespace) -> None:
    from lens_tune.export.merge import merge_adapter
    from lens_tune.model.sources import locate_model
    from lens_tune.train.run_folder import adapter_dir_of

    adapter = adapter_dir_of(args.adapter)
    out = merge_adapter(adapter, locate_model(args.model, args.revision), args.out, args.scale)
    print(f"Merged {adapter} (scale {args.scale}) into {out.resolve()}; load it with "
          f"LensTransformer2DModel.from_pretrained('{out}').")


def load(args: argparse.Namespace):
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe

    return load_recipe(args.recipe, Recipe, args.overrides)


def run_validate(args: argparse.Namespace) -> None:
    from lens_tune.recipe.load import dump_yaml, explain
    from lens_tune.recipe.schema import Recipe

    if args.explain:
        print(explain(Recipe))
        if args.recipe is None:
            return
    if args.recipe is None:
        raise UsageError("validate needs a RECIPE (or --explain alone to list the fields).")
    recipe = load(args)
    from lens_tune.data.prepare import dataset_items
    from lens_tune.model.sources import locate_model

    counts = [len(dataset_items(d)) for d in recipe.data.datasets]
    if recipe.model.source == "tiny":
        model_note = "the built-in tiny model (built on first use)"
    else:
        try:
            model_root = locate_model(recipe.model.source, recipe.model.revision, download=False)
            model_note = f"found at {model_root}" if model_root else "not downloaded yet: fetched from the Hub on first run"
        except LensTuneError as err:
            model_note = f"NOT AVAILABLE: {err}"
    print(dump_yaml(recipe))
    print(f"OK: {args.recipe}")
    for dataset, count in zip(recipe.data.datasets, counts):
        print(f"  {dataset.kind} dataset {dataset.folder or dataset.metadata or dataset.hub}: {count} image(s)")
    print(f"  model {recipe.model.source}: {model_note}")


def run_cache(args: argparse.Namespace) -> None:
    import torch

    from lens_tune.data.prepare import prepare_training_data

    recipe = load(args)
    device = torch.device(args.device) if args.device else None
    prepared = prepare_training_data(recipe, device=device)
    print(
        f"Caches ready in {prepared.cache_dir}: {len(prepared.examples)} training image(s); "
        f"text features {prepared.encoded['text']} encoded / {prepared.reused['text']} reused, "
        f"latents {prepared.encoded['latents']} encoded / {prepared.reused['latents']} reused."
    )


def run_sample(args: argparse.Namespace) -> None:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from lens_tune import LensPipeline, __version__
    from lens_tune.model.tiny import tiny_pipeline_dir

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was asked for, but no CUDA GPU is visible. Use --device cpu.")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    tiny = args.model == "tiny"
    width = args.width or (128 if tiny else 1024)
    height = args.height or (128 if tiny else 1024)

    source = tiny_pipeline_dir() if tiny else args.model
    print(f"Loading {args.model} ({str(dtype).removeprefix('torch.')}, {device}) ...", file=sys.stderr)
    load_device = "cpu" if args.cpu_offload else device
    pipe = LensPipeline.from_pretrained(source, torch_dtype=dtype, revision=args.revision, device=load_device)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    if args.adapter:
        pipe.load_lora_weights(args.adapter, adapter_name="adapter", scale=args.adapter_scale)

    generator = torch.Generator("cpu").manual_seed(args.seed)  # CPU noise: same images on every device
    images = pipe(
        args.prompt,
        negative_prompt=args.negative,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=generator,
    ).images

    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "model": args.model,
        "revision": args.revision,
        "adapter": args.adapter.name if args.adapter else None,
        "adapter_scale": args.adapter_scale if args.adapter else None,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "width": width,
        "height": height,
        "dtype": str(dtype).removeprefix("torch."),
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "lens_tune_version": __version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        info = PngInfo()
        info.add_text("lens-tune", json.dumps(dict(settings, index=index)))
        path = args.out / f"seed{args.seed}-{index:02d}.png"
        image.save(path, pnginfo=info)
        written.append(path)
    print(f"Wrote {len(written)} image(s) to {args.out.resolve()}:")
    for path in written:
        print(f"  {path}")


def run_plan(args: argparse.Namespace) -> None:
    from lens_tune.plan import parse_size, plan_recipe

    try:
        vram = parse_size(args.vram) if args.vram else None
    except ValueError as err:
        raise UsageError(f"--vram: {err}") from None
    print(plan_recipe(load(args), str(args.recipe), args.device, vram, args.text_tokens).text)


def check_memory_plan(args: argparse.Namespace) -> None:
    """`run`'s pre-check: print the memory plan; on a GPU, refuse a run whose training or validation will not fit
    (unless --force). On a CPU it only reports: host memory is not budgeted."""
    import torch

    from lens_tune.plan import plan_recipe

    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    result = plan_recipe(load(args), str(args.recipe), "cuda" if on_gpu else "cpu")
    if on_gpu and result.fits is False and not args.force:
        print(result.text, file=sys.stderr)
        raise UsageError("the memory plan above does not fit this GPU: apply one of its changes, or train anyway "
                         "with --force")
    print(result.text)


def run_training(args: argparse.Namespace) -> None:
    if "LOCAL_RANK" not in os.environ:  # once, before any process starts
        check_memory_plan(args)
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch_with_accelerate(args)
    import torch

    from lens_tune.train.loop import train
    from lens_tune.train.resume import resolve_resume

    recipe = load(args)
    if recipe.output.name is None:
        recipe.output.name = args.recipe.stem.removesuffix(".lock")
    run_dir, checkpoint = (None, None)
    if args.resume:
        run_dir, checkpoint, recipe = resolve_resume(args.resume, recipe, args.recipe, args.overrides)
    device = torch.device("cpu") if args.device == "cpu" else None
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(recipe, resume=run_dir, checkpoint=checkpoint, device=device)
    except (LensTuneError, OSError, RuntimeError, KeyboardInterrupt) as error:
        folder = getattr(error, "run_folder", None)
        # say how to go on: resume the run, or (no run folder yet) run again, reusing the caches; a mistake in the
        # recipe or the data needs no such hint: its message says what to fix
        bad_input = isinstance(error, LensTuneError) and not isinstance(error, DiskFullError)
        if main_process and (folder or not bad_input):
            how = (f"resume with:\n  lens-tune run {args.recipe} --resume {folder}" if folder else
                   f"the caches written so far are kept; run again to continue:\n  lens-tune run {args.recipe}")
            print(f"\n{'Interrupted' if isinstance(error, KeyboardInterrupt) else 'Stopped'}; {how}", file=sys.stderr)
        raise
    if not main_process:
        return
    command = f"lens-tune run {args.recipe} --resume {result.run}"
    if result.state == "interrupted":
        print(f"\nInterrupted at step {result.step}; the checkpoint is in {result.run / 'checkpoints'}.\n"
              f"Resume with:\n  {command}")
        raise SystemExit(130)
    print(
        f"\nFinished {result.step} steps. Run folder: {result.run}\n"
        f"  adapter:     {result.run / 'adapter'}\n"
        f"  samples:     {result.run / 'samples'}\n"
        f"  checkpoints: {result.run / 'checkpoints'}\n"
        "Next:\n"
        f"  lens-tune sample --model {recipe.model.source} --adapter {result.run / 'adapter'} --prompt \"...\" --out samples/\n"
        f"  lens-tune export {result.run}"
    )


def relaunch_with_accelerate(args: argparse.Namespace) -> None:
    """Re-run this command under `accelerate launch` with N processes (gloo on CPU, NCCL on GPUs)."""
    import subprocess

    argv = [str(args.recipe), *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.device != "auto":
        argv += ["--device", args.device]
    # --multi_gpu selects accelerate's torchrun launcher, which also runs N CPU processes (gloo) when there is no
    # GPU or --device cpu; its --cpu flag would start a single process.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    status = subprocess.call([*launch, "-m", "lens_tune", "run", *argv])
    if status:
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (`run r.yaml --device cpu train.steps=5`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_bitsandbytes_notice()
    try:
        args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except (LensTuneError, ValueError, OSError) as err:
        if args.verbose:
            raise
        print(f"lens-tune {args.command}: error: {err}", file=sys.stderr)
        print("  (run with --verbose for details)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lens-tune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
