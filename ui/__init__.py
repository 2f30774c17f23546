"""lens-tune's Gradio dashboard (`lens-tune ui`), installed as the package `lens_tune_ui` (code in ui/)."""

from .launch import ExposureError, launch

__all__ = ["ExposureError", "launch"]
