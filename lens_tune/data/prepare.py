"""The data phases of a run, in order: check the images, generate class images, cache text features, cache latents.

GPT-OSS (20B) and the Lens transformer cannot share a 16 GB GPU, so every caption is encoded once and cached, the
encoder is released, every image variant is encoded once by the VAE and cached, and training then reads only the
caches. `lens-tune cache` runs these phases alone; `lens-tune run` runs them when anything is missing.
"""

from __future__ import annotations

import gc
import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lens_tune.data.buckets import Bucket, assign_bucket, bucket_histogram, fit_to_bucket, format_histogram
from lens_tune.data.cache import FeatureCache, content_key, folder_fingerprint
from lens_tune.data.captions import caption_variants, resolve_caption
from lens_tune.data.class_images import class_image_settings, generate_class_images
from lens_tune.data.images import CheckedImage, ImageProblem, bad_images_message, check_images, load_image
from lens_tune.data.sources import ImageItem, folder_items, hub_items, metadata_items
from lens_tune.data.text_encoding import encode_captions
from lens_tune.errors import DatasetError
from lens_tune.faults import fault_point
from lens_tune.model.sources import locate_model
from lens_tune.recipe.schema import TRIGGER_PLACEHOLDER, Dataset, Recipe

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class TrainingExample:
    """One training image: the cache keys of its image variants and caption variants."""

    origin: str
    kind: str  # subject, style or class
    bucket: Bucket
    latent_keys: tuple[str, ...]
    caption_keys: tuple[str, ...]
    caption_dropout: float
    loss_weight: float
    repeats: int


@dataclass
class PreparedData:
    """What training needs, all of it in the cache."""

    cache_dir: Path
    examples: list[TrainingExample]
    prompt_keys: dict[str, str]  # validation prompts (trigger substituted) -> text-feature key
    fingerprint: str  # every training image's content, caption variants and bucket; recorded in recipe.lock.yaml
    encoded: dict[str, int] = field(default_factory=dict)  # phase -> items encoded this time
    reused: dict[str, int] = field(default_factory=dict)  # phase -> items found in the cache


def cache_root_of(recipe: Recipe) -> Path:
    """Root of the caches shared by runs: features/ and class_images/ live under it."""
    if recipe.cache.dir is not None:
        return recipe.cache.dir
    from lens_tune.model.tiny import cache_root

    return cache_root()


def with_trigger(text: str, recipe: Recipe) -> str:
    return text.replace(TRIGGER_PLACEHOLDER, recipe.data.trigger) if recipe.data.trigger else text


def dataset_items(dataset: Dataset) -> list[ImageItem]:
    if dataset.folder is not None:
        return folder_items(dataset.folder)
    if dataset.metadata is not None:
        return metadata_items(dataset.metadata)
    return hub_items(dataset.hub, split=dataset.split, image_column=dataset.image_column,
                     caption_column=dataset.caption_column, revision=dataset.hub_revision)


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: images
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedImage:
    checked: CheckedImage
    dataset: Dataset  # class images get a synthetic one (square, centre crop, no dropout)
    bucket: Bucket
    captions: tuple[str, ...]
    kind: str  # subject, style or class
    loss_weight: float = 1.0


def plan_images(recipe: Recipe, log: Callable[[str], None]) -> list[PlannedImage]:
    """Read and check every image, give each a bucket and its caption variants. Bad images are reported together."""
    data = recipe.data
    planned, problems, total = [], [], 0
    for index, dataset in enumerate(data.datasets):
        items = dataset_items(dataset)
        total += len(items)
        checked, bad = check_images(items, on_bad_image="skip", background=data.background, min_size=data.min_image_size)
        problems += bad
        for image in checked:
            bucket = (
                assign_bucket(image.width, image.height, dataset.resolution, dataset.max_upscale)
                if dataset.bucketing
                else square_bucket(image, dataset)
            )
            if bucket is None:
                problems.append(ImageProblem(
                    image.item.origin,
                    f"{image.width}x{image.height} is too small for resolution {dataset.resolution} without upscaling "
                    f"more than {dataset.max_upscale}x (raise max_upscale or add a lower resolution)",
                ))
                continue
            caption = resolve_caption(
                image.item.caption,
                instance_prompt=recipe.dreambooth.instance_prompt,
                trigger=data.trigger,
                trigger_mode=data.trigger_mode,
                use_sidecars=dataset.use_captions,
                origin=image.item.origin,
            )
            variants = caption_variants(caption, shuffle=dataset.shuffle_tags, num_shuffles=dataset.shuffle_variants,
                                        keep_tokens=dataset.keep_tags, seed=recipe.train.seed)
            planned.append(PlannedImage(image, dataset, bucket, tuple(variants), dataset.kind))
        log(f"dataset {index + 1} ({dataset.kind}): {len(checked)} image(s) from {dataset.folder or dataset.metadata or dataset.hub}")
    if problems:
        if data.on_bad_image == "error":
            raise DatasetError(bad_images_message(problems, total))
        log(f"skipped {len(problems)} image(s):\n" + "\n".join(f"  {p.origin}: {p.reason}" for p in problems))
    if not planned:
        raise DatasetError("No usable training images: every dataset is empty or all images were skipped.")
    return planned


def plan_class_images(recipe: Recipe, items: list[ImageItem]) -> list[PlannedImage]:
    """Class images train square, centre-cropped, with the class prompt and the prior loss weight."""
    size = class_image_settings(recipe)["size"]
    dataset = Dataset(kind="subject", folder=Path("."), resolution=[size], bucketing=False, caption_dropout=0.0,
                      max_upscale=4.0, use_captions=False)
    checked, bad = check_images(items, on_bad_image="error", background=recipe.data.background, min_size=16)
    caption = recipe.dreambooth.class_prompt
    return [
        PlannedImage(image, dataset, square_bucket(image, dataset), (caption,), "class", recipe.dreambooth.prior_loss_weight)
        for image in checked
    ]


def dataset_fingerprint(planned: list[PlannedImage]) -> str:
    return content_key(images=sorted(
        [p.checked.content_hash, list(p.captions), p.bucket.width, p.bucket.height, p.kind] for p in planned
    ))


def square_bucket(image: CheckedImage, dataset: Dataset) -> Bucket | None:
    size = dataset.resolution[0]
    if min(image.width, image.height) * dataset.max_upscale < size:
        return None
    return Bucket(width=size, height=size, aspect="1:1", resolution=size)


# ----------------------------------------------------------------------------------------------------------------
# Phases 3 and 4: caches
# ----------------------------------------------------------------------------------------------------------------
def peak_memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cache_text_features(
    captions: list[str], keys: dict[str, str], cache: FeatureCache, model_root: Path, recipe: Recipe,
    device: torch.device, dtype: torch.dtype, shard_bytes: int,
) -> int:
    """Encode the captions whose keys are missing."""
    todo = [c for c in captions if keys[c] not in cache]
    if not todo:
        return 0
    encoded = encode_captions(model_root, recipe, device, dtype, todo, MAX_SEQUENCE_LENGTH)
    with cache.writer(shard_bytes) as writer:
        for caption, features, mask in tqdm(encoded, total=len(todo), desc="text features", unit="caption"):
            valid = mask[0]
            writer.add(keys[caption], {f"layer.{i}": f[0, valid] for i, f in enumerate(features)}, {"caption": caption})
            fault_point("caching")
    return len(todo)


@dataclass(frozen=True)
class LatentJob:
    key: str
    image: PlannedImage
    crop_seed: int | None
    flip: bool


def cache_latents(
    jobs: list[LatentJob], cache: FeatureCache, model_root: Path, device: torch.device, background, shard_bytes: int
) -> int:
    todo = [job for job in jobs if job.key not in cache]
    if not todo:
        return 0
    from lens_tune.model.latents import encode_pixels, load_vae, pixels_from_image

    vae = load_vae(model_root / "vae", device=device)
    with cache.writer(shard_bytes) as writer, torch.no_grad():
        for job in tqdm(todo, desc="latents", unit="image"):
            item = job.image.checked.item
            image = load_image(item.read_bytes(), item.origin, background=background, min_size=1)
            image = fit_to_bucket(image, job.image.bucket, crop=job.image.dataset.crop, flip=job.flip, crop_seed=job.crop_seed)
            tokens = encode_pixels(vae, pixels_from_image(image))[0]
            writer.add(job.key, {"tokens": tokens}, {"origin": item.origin, "grid": [image.height // 16, image.width // 16]})
            fault_point("caching")
    del vae
    return len(todo)


# ----------------------------------------------------------------------------------------------------------------
# All phases
# ----------------------------------------------------------------------------------------------------------------
def prepare_training_data(recipe: Recipe, device: torch.device | None = None, log: Callable[[str], None] = print) -> PreparedData:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if (recipe.model.dtype == "bf16" or (recipe.model.dtype == "auto" and device.type == "cuda")) else torch.float32
    model_root = locate_model(recipe.model.source, recipe.model.revision)

    log("== checking images")
    planned = plan_images(recipe, log)
    if recipe.dreambooth.prior_preservation:
        log("== class images")
        planned += plan_class_images(recipe, generate_class_images(recipe, cache_root_of(recipe), device, log))
    log(format_histogram(bucket_histogram([p.bucket for p in planned])))

    cache = FeatureCache(cache_root_of(recipe) / "features")
    text_identity = dict(
        encoder=folder_fingerprint(model_root / "text_encoder"), tokenizer=folder_fingerprint(model_root / "tokenizer"),
        dtype=str(dtype), max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    prompts = {with_trigger(p, recipe) for p in recipe.validation.prompts}
    if recipe.validation.negative_prompt.strip():
        prompts.add(with_trigger(recipe.validation.negative_prompt, recipe))
    captions = sorted({c for p in planned for c in p.captions} | prompts)
    text_keys = {c: content_key(kind="text", caption=c, **text_identity) for c in captions}

    vae_identity = dict(vae=folder_fingerprint(model_root / "vae"), background=recipe.data.background)
    jobs_by_image = {}
    for p in planned:
        crops = [None] if p.dataset.crop == "center" else list(range(p.dataset.crop_variants))
        flips = [False, True] if p.dataset.flip else [False]
        jobs_by_image[id(p)] = [
            LatentJob(
                content_key(kind="latent", image=p.checked.content_hash, width=p.bucket.width, height=p.bucket.height,
                            crop=p.dataset.crop, crop_seed=seed, flip=flip, **vae_identity),
                p, seed, flip,
            )
            for seed in crops for flip in flips
        ]
    jobs = [job for js in jobs_by_image.values() for job in js]

    corrupt = cache.drop_corrupt([*text_keys.values(), *(j.key for j in jobs)])
    if corrupt:
        log(f"{len(corrupt)} corrupt cache entr{'y' if len(corrupt) == 1 else 'ies'} will be re-encoded")
    log(expected_size_note(captions, text_keys, jobs, cache, model_root, dtype))

    log("== text features")
    shard_bytes = recipe.cache.shard_mib * 2**20
    encoded_text = cache_text_features(captions, text_keys, cache, model_root, recipe, device, dtype, shard_bytes)
    release(device)
    log(f"text features: {encoded_text} encoded, {len(captions) - encoded_text} reused; {peak_memory_note(device)}")

    log("== latents")
    encoded_latents = cache_latents(jobs, cache, model_root, device, recipe.data.background, shard_bytes)
    release(device)
    log(f"latents: {encoded_latents} encoded, {len(jobs) - encoded_latents} reused; {peak_memory_note(device)}")

    examples = [
        TrainingExample(
            origin=p.checked.item.origin,
            kind=p.kind,
            bucket=p.bucket,
            latent_keys=tuple(j.key for j in jobs_by_image[id(p)]),
            caption_keys=tuple(text_keys[c] for c in p.captions),
            caption_dropout=p.dataset.caption_dropout,
            loss_weight=p.loss_weight,
            repeats=p.dataset.repeats,
        )
        for p in planned
    ]
    return PreparedData(
        cache_dir=cache.root,
        examples=examples,
        prompt_keys={p: text_keys[p] for p in prompts},
        fingerprint=dataset_fingerprint(planned),
        encoded={"text": encoded_text, "latents": encoded_latents},
        reused={"text": len(captions) - encoded_text, "latents": len(jobs) - encoded_latents},
    )


def expected_size_note(captions, text_keys, jobs, cache, model_root: Path, dtype: torch.dtype) -> str:
    """Rough size of what will be added to the cache (text length estimated from the caption's words)."""
    from lens_tune.model.transformer import LensTransformer2DModel

    config = LensTransformer2DModel.load_config(model_root / "transformer")
    bytes_per = torch.finfo(dtype).bits // 8
    new_text = [c for c in captions if text_keys[c] not in cache]
    text_bytes = sum((len(c.split()) * 2 + 20) * config["enc_hidden_dim"] * len(config["selected_layer_index"]) * bytes_per for c in new_text)
    new_jobs = [j for j in jobs if j.key not in cache]
    latent_bytes = sum(j.image.bucket.width * j.image.bucket.height // 256 * config["in_channels"] * 4 for j in new_jobs)
    return (
        f"cache: {cache.root} ({len(cache)} entries); to encode: {len(new_text)} caption(s) ~{text_bytes / 2**20:.1f} MiB, "
        f"{len(new_jobs)} image variant(s) ~{latent_bytes / 2**20:.1f} MiB"
    )
