"""Starting the dashboard server: who may reach it, and with which settings Gradio serves it.

It listens on 127.0.0.1 unless told otherwise. Anything reachable from other machines (--share, or a --host that is
not a loopback address) must have --auth: the page starts training and reads every run.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lens_tune.errors import LensTuneError

CSS = """
.lt-error { color: #b91c1c; font-weight: 600; }
.lt-event { color: inherit; }
#lt-events { max-height: 420px; overflow-y: auto; font-size: 0.9em; }
"""


def theme():
    """Gradio's default look with the system's fonts: the page fetches nothing from the internet (no Google Fonts)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


class ExposureError(LensTuneError):
    """The dashboard would be reachable from other machines without a password."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ExposureError("--auth takes USER:PASS (both non-empty)")
    return user, password


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> None:
    """ExposureError unless the server stays on this machine or asks for a password."""
    if auth is not None:
        return
    if share:
        raise ExposureError("--share makes the dashboard reachable from the internet through a public link, and "
                            "it can start training and read every run: add --auth USER:PASS")
    if not is_loopback(host):
        raise ExposureError(f"--host {host} makes the dashboard reachable from other machines, and it can start "
                            "training and read every run: add --auth USER:PASS, or keep --host 127.0.0.1 and use an "
                            "SSH tunnel")


def launch(runs: Path, recipes: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           auth: str | None = None, block: bool = True, refresh_seconds: float = 2.0):
    """Build the dashboard and serve it; with block=False return (dashboard, url) at once (tests, benchmark)."""
    credentials = parse_auth(auth)
    check_exposure(host, share, credentials)
    from .app import build_app  # gradio takes seconds to import: only once the checks above passed

    dashboard = build_app(runs, recipes, refresh_seconds)
    _, url, share_url = dashboard.blocks.launch(
        server_name=host, server_port=port, share=share, auth=credentials, prevent_thread_lock=True, quiet=True,
        allowed_paths=[str(dashboard.runs.folder.path)],  # the sample images; Gradio serves nothing else of ours
        css=CSS, theme=theme(), footer_links=[],
    )
    if block:
        print(f"lens-tune dashboard on {url}" + (f" and {share_url}" if share_url else "") +
              f"\n  runs: {dashboard.runs.folder.path}\n  recipes: {dashboard.recipes.folder.path}\n"
              "Ctrl-C stops the dashboard; trainings started from it keep running.", flush=True)
        dashboard.blocks.block_thread()
    return dashboard, url
