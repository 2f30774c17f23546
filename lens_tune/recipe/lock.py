"""recipe.lock.yaml: the resolved recipe plus what is needed to reproduce the run and notice when inputs changed."""

from __future__ import annotations

import datetime as dt
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lens_tune.errors import RecipeError
from lens_tune.files import atomic_write_bytes
from lens_tune.recipe.schema import LockInfo, Recipe

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "datasets")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def locked(recipe: Recipe, dataset_fingerprint: str, model_fingerprint: str | None) -> Recipe:
    """The recipe with its lock section filled in."""
    from lens_tune import __version__

    info = LockInfo(
        lens_tune=__version__,
        packages=package_versions(),
        model={"source": recipe.model.source, "revision": recipe.model.revision, "fingerprint": model_fingerprint},
        dataset_fingerprint=dataset_fingerprint,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return recipe.model_copy(update={"lock": info})


def write_lock(recipe: Recipe, path: Path) -> None:
    from lens_tune.recipe.load import dump_yaml

    header = "# Written by lens-tune: every resolved setting of this run. `lens-tune run` on this file repeats it.\n"
    atomic_write_bytes(path, (header + dump_yaml(recipe)).encode())


def check_lock(recipe: Recipe, dataset_fingerprint: str) -> list[str]:
    """Differences between a locked recipe and the present: a changed dataset is an error, other drift is returned."""
    lock = recipe.lock
    if lock is None:
        return []
    if lock.dataset_fingerprint != dataset_fingerprint:
        raise RecipeError(
            "The training data changed since this lock file was written (dataset fingerprint "
            f"{lock.dataset_fingerprint[:12]} then, {dataset_fingerprint[:12]} now): images or captions were added, "
            "removed or edited. Run from the original recipe to train on the data as it is now."
        )
    now = package_versions()
    return [f"{name} {lock.packages.get(name)} then, {now[name]} now" for name in PACKAGES if lock.packages.get(name) != now[name]]
