"""DreamBooth on lens-toy, measured the way the DreamBooth paper measures it, in minutes on a CPU.

For each toy subject (lens_tune.toy.subjects: a star yellow above and blue below, `sks`; a pink heart, a shape the base
never saw, `zwx`), `lens-tune run recipes/toy-dreambooth.yaml` fine-tunes lens-toy on its 6 instance pictures twice,
without and with the prior-preservation loss. The base model and each adapter then draw fixed prompts with fixed
seeds through `LensPipeline`, and the toy evaluator scores the pictures:

- subject fidelity (DINO's role): cosine similarity of evaluator embeddings between generated pictures of subject
  prompts and the real instance pictures; and the share of those pictures in which the evaluator reads the
  subject's look (its shape, colour and texture);
- prompt fidelity: accuracy of the setting a subject prompt asks for ("a sks star on a green background");
- class drift: accuracy of class prompts ("a red star on a gray background") before and after fine-tuning, and how
  much class pictures look like the subject (similarity to the instance pictures, share showing its look).

    .venv/bin/python benchmarks/dreambooth_toy.py                    # records results/dreambooth_toy.json
    .venv/bin/python benchmarks/dreambooth_toy.py --fast --no-record  # one subject, fewer seeds (tests/test_toy_benchmark.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from recording import finish

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "toy-dreambooth.yaml"
EXAMPLES = REPO / "examples"

FULL = {"subjects": ["two-tone-star", "heart"], "seeds": 8, "steps": None}  # steps None: the recipe's
FAST = {"subjects": ["two-tone-star"], "seeds": 3, "steps": None}


def train(subject, prior: bool, work: Path, steps: int | None, model: str, extra: list[str]) -> dict:
    """One `lens-tune run` in its own process; its wall time and peak resident memory (ru_maxrss of that child)."""
    name = f"{subject.name}-{'prior' if prior else 'no-prior'}"
    overrides = [
        f"model.source={model}",
        f"data.datasets.0.folder={EXAMPLES / subject.folder}",
        f"data.trigger={subject.trigger}",
        f'dreambooth.instance_prompt="a [trigger] {subject.noun}"',
        f'dreambooth.class_prompt="{subject.class_prompt}"',
        f"dreambooth.prior_preservation={str(prior).lower()}",
        f"output.dir={work / 'runs'}", f"output.name={name}", f"cache.dir={work / 'cache'}",
        "validation.prompts=[]",
        *([f"train.steps={steps}"] if steps else []),
        *extra,
    ]
    command = [sys.executable, "-m", "lens_tune", "run", str(RECIPE), *overrides, "--device", "cpu"]
    log = work / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lens-tune run failed for {name}; see {log}:\n{log.read_text()[-3000:]}")
    run = max((work / "runs" / name).iterdir())
    return {"run": run, "seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def draw(pipe, prompts: list[str], seeds: int, steps: int, guidance: float):
    """Every prompt with seeds 0..seeds-1, as pixels [len(prompts) * seeds, 3, 64, 64] in [-1, 1]."""
    from lens_tune.toy import world
    from lens_tune.toy.evaluator import pixels

    images = []
    for prompt in prompts:
        images += pipe(prompt, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, num_inference_steps=steps,
                       guidance_scale=guidance, num_images_per_prompt=seeds,
                       generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images
    return pixels(images)


def measure(evaluator, subject, real_embeddings: torch.Tensor, images: torch.Tensor, asked: list[dict]) -> dict:
    """Pictures against the subject: mean similarity to its instance pictures, the share showing its look, and the
    accuracy of what each picture was asked for (`asked`, one dict per picture), overall and per label."""
    from lens_tune.toy.evaluator import accuracy

    predicted = evaluator.predict(images)
    similarity = (evaluator.embed(images) @ real_embeddings.T).mean(dim=1)
    shows_look = [all(p[k] == v for k, v in subject.look_labels.items()) for p in predicted]
    hits = [p[k] == v for p, w in zip(predicted, asked) for k, v in w.items()]
    return {
        "similarity_to_subject": round(float(similarity.mean()), 4),
        "shows_subject_look": round(float(np.mean(shows_look)), 4),
        "accuracy": round(float(np.mean(hits)), 4),
        "accuracy_per_label": {k: round(v, 4) for k, v in accuracy(predicted, asked).items()},
    }


def score(pipe, evaluator, subject, real_embeddings: torch.Tensor, seeds: int, steps: int,
          guidance: float) -> tuple[dict, torch.Tensor]:
    """Subject fidelity, prompt fidelity and class-prompt accuracy of one model (base, or base + adapter), and its
    seed-0 picture of every subject prompt, then every class prompt."""
    results, first_seed = {}, []
    for kind, pairs in (("subject", subject.subject_prompts(subject.trigger)), ("class", subject.class_prompts())):
        prompts, wanted = zip(*pairs)
        images = draw(pipe, list(prompts), seeds, steps, guidance)
        first_seed.append(images[::seeds])
        results[kind] = measure(evaluator, subject, real_embeddings, images, [w for w in wanted for _ in range(seeds)])
    metrics = {
        "subject_fidelity": results["subject"]["similarity_to_subject"],
        "subject_look": results["subject"]["shows_subject_look"],
        "prompt_fidelity": results["subject"]["accuracy"],
        "prompt_fidelity_per_label": results["subject"]["accuracy_per_label"],
        "class_accuracy": results["class"]["accuracy"],
        "class_accuracy_per_label": results["class"]["accuracy_per_label"],
        "class_similarity_to_subject": results["class"]["similarity_to_subject"],
        "class_shows_subject_look": results["class"]["shows_subject_look"],
    }
    return metrics, torch.cat(first_seed)


def ceiling(evaluator, subject, real_embeddings: torch.Tensor, seeds: int, vae) -> tuple[dict, dict]:
    """The same subject metrics for real pictures of the subject in the settings the subject prompts ask for (large,
    as in its instance pictures; other settings than theirs): what a perfect fine-tune would score, the role of the
    DreamBooth paper's "real images" row. Then the same pictures encoded and decoded by the model's VAE: every
    generated picture comes out of that decoder, so this is as far as a fine-tune of the transformer can get."""
    from lens_tune.toy import world
    from lens_tune.toy.evaluator import pixels

    pairs = subject.subject_prompts(subject.trigger)
    scenes = [world.moved(subject.look, 0, subject.first_index + 1000 + i * seeds + s, size="large", **wanted)
              for i, (_, wanted) in enumerate(pairs) for s in range(seeds)]
    drawn = pixels([world.render(sc) for sc in scenes])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(drawn).latent_dist.mode()).sample.clamp(-1, 1)
    asked = [w for _, w in pairs for _ in range(seeds)]
    results = [measure(evaluator, subject, real_embeddings, images, asked) for images in (drawn, decoded)]
    return tuple({"subject_fidelity": r["similarity_to_subject"], "subject_look": r["shows_subject_look"],
                  "prompt_fidelity": r["accuracy"]} for r in results)


def benchmark(config: dict, work: Path, model: str = "toy", evaluator: Path | None = None,
              pictures_dir: Path | None = None, overrides: list[str] = (), log=print) -> dict:
    from lens_tune import LensPipeline
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe
    from lens_tune.model.sources import locate_model
    from lens_tune.toy import evaluator_dir
    from lens_tune.toy.evaluator import ToyEvaluator, pixels
    from lens_tune.toy.subjects import SUBJECTS

    recipe = load_recipe(RECIPE, Recipe)
    steps, guidance = recipe.validation.steps, recipe.validation.guidance
    evaluator = ToyEvaluator.load(evaluator or evaluator_dir())
    pipe = LensPipeline.from_pretrained(locate_model(model))
    pipe.set_progress_bar_config(disable=True)
    report = {"subjects": {}}
    for name in config["subjects"]:
        subject = SUBJECTS[name]
        real = evaluator.embed(pixels(sorted_images(EXAMPLES / subject.folder)))  # the instance pictures, embedded once
        base, base_pictures = score(pipe, evaluator, subject, real, config["seeds"], steps, guidance)
        log(f"{name}: base {base}")
        drawn, decoded = ceiling(evaluator, subject, real, config["seeds"], pipe.vae)
        log(f"{name}: real pictures of the subject in the prompts' settings {drawn}; through the VAE {decoded}")
        entry, rows = {"base": base, "real": drawn, "real_through_vae": decoded}, [base_pictures]
        for prior in (False, True):
            run = train(subject, prior, work, config["steps"], model, list(overrides))
            pipe.load_lora_weights(run["run"] / "adapter", adapter_name="subject")
            tuned, pictures = score(pipe, evaluator, subject, real, config["seeds"], steps, guidance)
            pipe.unload_lora_weights()
            rows.append(pictures)
            tuned["class_drift"] = round(base["class_accuracy"] - tuned["class_accuracy"], 4)
            tuned.update(train_seconds=run["seconds"], train_peak_rss_mib=run["peak_rss_mib"])
            entry["prior" if prior else "no_prior"] = tuned
            log(f"{name}: {'with' if prior else 'without'} prior preservation {tuned}")
        report["subjects"][name] = entry
        if pictures_dir:
            save_grid(rows, pictures_dir / f"{name}.png")
    report["settings"] = {
        "recipe": str(RECIPE.relative_to(REPO)), "train_seed": recipe.train.seed,
        "train_steps": config["steps"] or recipe.train.steps, "sample_seeds": list(range(config["seeds"])),
        "sample_steps": steps, "guidance": guidance, "overrides": list(overrides),
    }
    return report


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of pictures [N, 3, 64, 64] in [-1, 1] (base, without prior, with prior) as one PNG, shown at 2x."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, rows*64, N*64]
    array = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(path)


def sorted_images(folder: Path):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one subject and 3 seeds (the test's version)")
    parser.add_argument("--no-record", action="store_true", help="do not write results/dreambooth_toy.json")
    parser.add_argument("--model", default="toy", help="the base: lens-toy (default) or a rebuilt lens-toy folder")
    parser.add_argument("--evaluator", type=Path, help="an evaluator folder (default: the shipped one)")
    parser.add_argument("--pictures", type=Path, help="write a before/after grid per subject (PNG) into this folder")
    parser.add_argument("--work", type=Path, help="keep runs and caches here (class images are then reused by the next "
                        "call) instead of in a temporary folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the training runs (repeatable), e.g. --set train.learning_rate=1e-3")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = benchmark(FAST if args.fast else FULL, work, args.model, args.evaluator, args.pictures, args.set)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    finish(report, "dreambooth_toy", record=not args.no_record)

if __name__ == "__main__":
    main()
