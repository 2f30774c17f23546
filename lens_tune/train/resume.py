"""What `lens-tune run RECIPE --resume [PATH]` continues: which run folder, which checkpoint, which settings."""

from __future__ import annotations

from pathlib import Path

from lens_tune.errors import LensTuneError
from lens_tune.recipe.schema import Recipe


def resolve_resume(spec: str, recipe: Recipe, recipe_path: Path, overrides: list[str]) -> tuple[Path, Path | None, Recipe]:
    """(run folder, checkpoint or None for its newest, the recipe to continue with).

    A run continues with the settings in its own recipe.lock.yaml (plus this command's overrides, e.g. more
    train.steps), so editing the recipe file after starting cannot silently change a resumed run.
    """
    from lens_tune.recipe.load import load_recipe
    from lens_tune.train.checkpoint import latest_checkpoint

    checkpoint = None
    if spec == "latest":
        runs = recipe.output.dir / (recipe.output.name or recipe_path.stem)
        candidates = sorted((p for p in runs.glob("*") if (p / "recipe.lock.yaml").is_file()), reverse=True)
        run = next((p for p in candidates if latest_checkpoint(p / "checkpoints") is not None), None)
        if run is None:
            raise LensTuneError(f"--resume: no run of this recipe with a checkpoint under {runs}; start it without --resume.")
    else:
        path = Path(spec).expanduser().resolve()
        if (path / "checksums.json").is_file() and path.parent.name == "checkpoints":
            run, checkpoint = path.parent.parent, path
        elif (path / "recipe.lock.yaml").is_file():
            run = path
        else:
            raise LensTuneError(f"--resume {spec}: not a run folder (no recipe.lock.yaml) nor one of its checkpoints.")
        if checkpoint is None and latest_checkpoint(run / "checkpoints") is None:
            raise LensTuneError(f"--resume {spec}: the run has no complete checkpoint yet; start it again without --resume.")
    locked = load_recipe(run / "recipe.lock.yaml", Recipe, overrides)
    changed = [
        name for name in Recipe.model_fields
        if name not in ("lock", "output") and getattr(locked, name) != getattr(recipe, name)
    ]
    if changed:
        print(f"note: resuming with the settings recorded in {run / 'recipe.lock.yaml'}; "
              f"{recipe_path} now differs in: {', '.join(changed)}")
    return run, checkpoint, locked
