"""lens-tune: LoRA/DreamBooth fine-tuning for Microsoft's Lens text-to-image model."""

__version__ = "0.1.0"

__all__ = ["LensPipeline", "LensTransformer2DModel", "__version__"]


def __getattr__(name: str):
    # Imported on first use: diffusers and transformers take seconds to import, and `lens-tune --help` needs neither.
    if name == "LensTransformer2DModel":
        from lens_tune.model.transformer import LensTransformer2DModel

        return LensTransformer2DModel
    if name == "LensPipeline":
        from lens_tune.model.pipeline import LensPipeline

        return LensPipeline
    raise AttributeError(f"module 'lens_tune' has no attribute {name!r}")
