"""Validation samples during training: the recipe's prompts with fixed seeds, from cached text features.

The text encoder is never loaded here: prompts were encoded in the caching phase, and the negative is Lens's
unconditional input (no text). Samples run one image at a time (a guidance batch of 2), far below a training step's
memory, with the training transformer itself (adapter applied) switched to eval mode for the duration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lens_tune.data.cache import FeatureCache
from lens_tune.faults import fault_point
from lens_tune.files import atomic_write
from lens_tune.recipe.schema import Recipe

VARIANT_DEFAULTS = {"lens": (20, 5.0), "lens-turbo": (4, 1.0), "lens-base": (50, 5.0)}  # steps, guidance


class ValidationSampler:
    def __init__(self, recipe: Recipe, prompt_keys: dict[str, str], cache: FeatureCache, model_root: Path,
                 device: torch.device):
        settings = recipe.validation
        default_steps, default_guidance = VARIANT_DEFAULTS[recipe.model.variant]
        size = recipe.data.datasets[0].resolution[0]
        self.steps = settings.steps or default_steps
        self.guidance = default_guidance if settings.guidance is None else settings.guidance
        self.width, self.height = settings.width or size, settings.height or size
        self.seeds = settings.seeds
        self.prompts = [(prompt, prompt_keys[prompt]) for prompt in prompt_keys if prompt != settings.negative_prompt]
        self.negative_key = prompt_keys.get(settings.negative_prompt) if settings.negative_prompt.strip() else None
        self.cache, self.model_root, self.device = cache, model_root, device
        self._vae = self._scheduler = None

    def _features(self, key: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        entry = self.cache.get(key)
        layers = [entry[f"layer.{i}"][None] for i in range(len(entry))]
        return layers, torch.ones(1, layers[0].shape[1], dtype=torch.bool)

    def render(self, transformer, folder: Path) -> list[Path]:
        """Render every prompt x seed into `folder` (PNGs with their settings, and grid.png); returns the images."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from lens_tune.model.latents import load_vae
        from lens_tune.model.pipeline import LensPipeline

        if self._vae is None:
            self._vae = load_vae(self.model_root / "vae", device=self.device)
            self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.model_root / "scheduler")
        pipe = LensPipeline(scheduler=self._scheduler, vae=self._vae, text_encoder=None, tokenizer=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        folder.mkdir(parents=True, exist_ok=True)
        negative = self._features(self.negative_key) if self.negative_key else (None, None)
        was_training = transformer.training
        transformer.eval()
        paths = []
        try:
            for p_index, (prompt, key) in enumerate(self.prompts):
                embeds, mask = self._features(key)
                for seed in self.seeds:
                    image = pipe(
                        prompt_embeds=embeds, prompt_mask=mask,
                        negative_prompt_embeds=negative[0], negative_prompt_mask=negative[1],
                        height=self.height, width=self.width, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, generator=torch.Generator("cpu").manual_seed(seed),
                    ).images[0]
                    info = PngInfo()
                    info.add_text("lens-tune", json.dumps({
                        "prompt": prompt, "seed": seed, "steps": self.steps, "guidance_scale": self.guidance,
                        "width": self.width, "height": self.height,
                    }))
                    path = folder / f"p{p_index:02d}-seed{seed}.png"
                    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), what="a validation sample")
                    paths.append(path)
                    fault_point("sampling")
        finally:
            transformer.train(was_training)
        save_grid(paths, len(self.seeds), folder / "grid.png")
        return paths


def save_grid(paths: list[Path], columns: int, target: Path) -> None:
    """One image with the samples in rows of `columns` (a row per prompt)."""
    if not paths:
        return
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    atomic_write(target, lambda tmp: grid.save(tmp, format="PNG"), what="the sample grid")
