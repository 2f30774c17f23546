"""lens-tune: LoRA/DreamBooth fine-tuning for Microsoft's Lens text-to-image model."""

from lens_tune.model.transformer import LensTransformer2DModel

__version__ = "0.1.0"

__all__ = ["LensPipeline", "LensTransformer2DModel", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in transformers' GPT-OSS; import it only when asked for.
    if name == "LensPipeline":
        from lens_tune.model.pipeline import LensPipeline

        return LensPipeline
    raise AttributeError(f"module 'lens_tune' has no attribute {name!r}")
