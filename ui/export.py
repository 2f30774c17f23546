"""Exporting a run's adapter and pushing it to the Hub from the page, through lens_tune.export.

The Hub token comes from HF_TOKEN or the saved login (lens_tune.export.hub resolves it); the page only says where
it would come from, never shows it, and has no field to type one.
"""

from __future__ import annotations

import os

from lens_tune.export.export import export_adapter
from lens_tune.export.hub import resolve_token

from .runs import Run


def token_source() -> str:
    if os.environ.get("HF_TOKEN", "").strip():
        return "Hub token: from the HF_TOKEN environment variable."
    if resolve_token():
        return "Hub token: from your saved login (`hf auth login`)."
    return "Hub token: none found. Set HF_TOKEN or run `hf auth login` before starting the dashboard to push."


def export_run(run: Run, choice: str, formats: list[str], repo: str | None = None, private: bool = True) -> str:
    """Export the final adapter or a checkpoint of `run` (choice: 'adapter' or 'checkpoints/step-...') into
    RUN/export/step-XXXXXX/, and push that folder to `repo` when given. No formats: every format that can carry
    the adapter's kind. Returns what was done, one line each."""
    if choice.startswith("export/"):
        raise ValueError(f"{choice} is an exported file already; pick the final adapter or a checkpoint")
    run.adapter_path(choice)  # one of the run's adapters, or an error
    lines: list[str] = []
    out = export_adapter(run.path / choice if choice != "adapter" else run.path, formats or None,
                         push_to=repo.strip() if repo else None, private=private, log=lines.append)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    return "\n".join([f"Exported to {run.id}/{out.relative_to(run.path).as_posix()}: {files}", *lines])
