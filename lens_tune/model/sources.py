"""Where a model source points: the built-in tiny or toy model, a local Lens folder, or a Hub repo id.

Microsoft withdrew its own Hub repos; mirrors exist (SceneWorks/Lens, SceneWorks/Lens-Turbo, Jinstudio/Lens, ...),
so a source is always configurable and never hard-wired.
"""

from __future__ import annotations

from pathlib import Path

from lens_tune.errors import ModelLoadError

WHERE_TO_GET_LENS = (
    "Lens weights: download a mirror in the Lens layout, e.g. `hf download SceneWorks/Lens --local-dir models/Lens` "
    "(Lens-Turbo: SceneWorks/Lens-Turbo), or set model.source to the Hub repo id to fetch it on first use."
)


# lens-toy, trained on the toy world and shipped with the package (lens_tune/toy)
TOY_SOURCES = ("toy", "lens-toy")


def is_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not _exists(Path(source))


def _shown(source: str) -> str:
    return source if len(source) <= 200 else source[:200] + f"... ({len(source)} characters)"


def _exists(path: Path) -> bool:
    """Path.exists, except that a name the filesystem cannot hold (too long, say) is simply not there."""
    try:
        return path.exists()
    except OSError:
        return False


def locate_model(source: str, revision: str | None = None, download: bool = True) -> Path | None:
    """The local pipeline folder of `source`.

    With download=False a Hub repo that is not in the local Hugging Face cache gives None (nothing is fetched);
    a local folder that does not exist, or is not a Lens pipeline, is an error either way.
    """
    if source == "tiny":
        from lens_tune.model.tiny import tiny_pipeline_dir

        return tiny_pipeline_dir()
    if source in TOY_SOURCES:
        from lens_tune.toy import toy_pipeline_dir

        return toy_pipeline_dir()
    if is_repo_id(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, revision=revision, local_files_only=not download))
        except HFValidationError:  # a name of the form owner/name that no Hub repo may have
            raise ModelLoadError(
                f"model.source '{_shown(source)}' is neither a local folder nor a valid Hub repo id (owner/name: "
                f"letters, digits, '-', '_' and '.', at most 96 characters). {WHERE_TO_GET_LENS}"
            ) from None
        except LocalEntryNotFoundError:
            if not download:
                return None
            raise ModelLoadError(f"Could not fetch '{source}' from the Hugging Face Hub (no network?). {WHERE_TO_GET_LENS}") from None
        except (HfHubHTTPError, OSError) as err:
            raise ModelLoadError(f"Could not fetch '{source}' from the Hugging Face Hub ({err}). {WHERE_TO_GET_LENS}") from err
    folder = Path(source).expanduser()
    if not _exists(folder):
        raise ModelLoadError(f"model.source '{_shown(source)}' does not exist. {WHERE_TO_GET_LENS}")
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.source '{source}' is not a Lens pipeline folder (no model_index.json). Point it at the folder "
            f"that holds transformer/, vae/, text_encoder/, tokenizer/ and scheduler/. {WHERE_TO_GET_LENS}"
        )
    return folder
