"""DreamBooth class images: generated once with a Lens model, kept in the cache and reused by later runs.

An image is identified by the model, prompt, seed, size, steps and guidance that made it, so changing any of them
makes new images and an unchanged recipe generates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lens_tune.data.cache import content_key, folder_fingerprint
from lens_tune.data.sources import ImageItem, folder_items
from lens_tune.data.text_encoding import encode_captions
from lens_tune.faults import fault_point
from lens_tune.files import atomic_write
from lens_tune.model.sources import locate_model
from lens_tune.recipe.schema import Recipe


def class_image_settings(recipe: Recipe) -> dict:
    """Model source, steps, guidance and size the class images are made with (recipe values or variant defaults)."""
    db = recipe.dreambooth
    source = db.class_image_model or recipe.model.source
    turbo = "turbo" in source.lower() if db.class_image_model else recipe.model.variant == "lens-turbo"
    return dict(
        source=source,
        revision=None if db.class_image_model else recipe.model.revision,
        steps=db.class_image_steps or (4 if turbo else 20),
        guidance=db.class_image_guidance if db.class_image_guidance is not None else (1.0 if turbo else 5.0),
        size=db.class_image_resolution or recipe.data.datasets[0].resolution[0],
    )


def drawn_by_the_run_s_reduced_base(recipe: Recipe) -> bool:
    """Whether the class images come from the run's own base made small on the GPU (quantised, or modulation on the
    host), which then stays there with the VAE; otherwise a plain base takes turns with the VAE (model CPU offload)."""
    reduced = recipe.model.quantization != "none" or recipe.model.modulation_device == "cpu"
    return recipe.dreambooth.class_image_model is None and reduced


def generate_class_images(recipe: Recipe, cache_root: Path, device: torch.device, log: Callable[[str], None]) -> list[ImageItem]:
    """The class images for the run: those in dreambooth.class_images_folder first, then generated ones."""
    db = recipe.dreambooth
    existing = folder_items(db.class_images_folder)[: db.num_class_images] if db.class_images_folder else []
    missing = db.num_class_images - len(existing)
    if missing <= 0:
        return existing
    settings = class_image_settings(recipe)
    model_root = locate_model(settings["source"], settings["revision"])
    identity = dict(
        transformer=folder_fingerprint(model_root / "transformer"), vae=folder_fingerprint(model_root / "vae"),
        prompt=db.class_prompt, size=settings["size"], steps=settings["steps"], guidance=settings["guidance"],
    )
    if db.class_image_model is None and recipe.model.quantization != "none":
        identity["quantization"] = recipe.model.quantization  # a quantised base draws other pictures
    folder = cache_root / "class_images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{content_key(kind='class_image', seed=db.class_image_seed + i, **identity)}.png" for i in range(missing)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.is_file()]
    log(f"class images: {len(existing)} from the folder, {missing - len(todo)} reused, {len(todo)} to generate "
        f"('{db.class_prompt}', {settings['steps']} steps, guidance {settings['guidance']}, {settings['size']} px)")
    if todo:
        from lens_tune.model.pipeline import LensPipeline
        from lens_tune.model.text_encoder import DEFAULT_MAX_SEQUENCE_LENGTH
        from lens_tune.train.base import load_base

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # One prompt: encoded once with GPT-OSS placed as for caption caching (model.text_encoder_device), so the
        # pipeline runs without its largest component.
        [(_, features, mask)] = encode_captions(model_root, recipe, device, dtype, [db.class_prompt],
                                                DEFAULT_MAX_SEQUENCE_LENGTH)
        # The run's own base draws them, loaded as the trainer loads it; drawn_by_the_run_s_reduced_base says where.
        where = device if drawn_by_the_run_s_reduced_base(recipe) or device.type != "cuda" else torch.device("cpu")
        components = {"transformer": load_base(recipe, model_root, where, dtype)[0]} if db.class_image_model is None else {}
        pipe = LensPipeline.from_pretrained(model_root, torch_dtype=dtype, device=where, text_encoder=None, tokenizer=None,
                                            **components)
        if where != device:
            pipe.enable_model_cpu_offload(device=device)
        pipe.set_progress_bar_config(disable=True)
        for i, path in tqdm(todo, desc="class images", unit="image"):
            image = pipe(
                prompt_embeds=features, prompt_mask=mask, height=settings["size"], width=settings["size"],
                num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                generator=torch.Generator("cpu").manual_seed(db.class_image_seed + i),
            ).images[0]
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), what="a class image")  # never half a PNG
            fault_point("class-images")
        del pipe
    return existing + [item for path in paths for item in folder_items_of(path)]


def folder_items_of(path: Path) -> list[ImageItem]:
    return [ImageItem(id=path.name, origin=str(path), read_bytes=path.read_bytes, caption=None)]
