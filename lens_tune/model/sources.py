"""Where a model source points: the built-in tiny model, a local Lens folder, or a Hub repo id.

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


def is_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def locate_model(source: str, revision: str | None = None, download: bool = True) -> Path | None:
    """The local pipeline folder of `source`.

    With download=False a Hub repo that is not in the local Hugging Face cache gives None (nothing is fetched);
    a local folder that does not exist, or is not a Lens pipeline, is an error either way.
    """
    if source == "tiny":
        from lens_tune.model.tiny import tiny_pipeline_dir

        return tiny_pipeline_dir()
    if is_repo_id(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, revision=revision, local_files_only=not download))
        except LocalEntryNotFoundError:
            if not download:
                return None
            raise ModelLoadError(f"Could not fetch '{source}' from the Hugging Face Hub (no network?). {WHERE_TO_GET_LENS}") from None
        except (HfHubHTTPError, OSError) as err:
            raise ModelLoadError(f"Could not fetch '{source}' from the Hugging Face Hub ({err}). {WHERE_TO_GET_LENS}") from err
    folder = Path(source).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model.source '{source}' does not exist. {WHERE_TO_GET_LENS}")
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.source '{source}' is not a Lens pipeline folder (no model_index.json). Point it at the folder "
            f"that holds transformer/, vae/, text_encoder/, tokenizer/ and scheduler/. {WHERE_TO_GET_LENS}"
        )
    return folder
