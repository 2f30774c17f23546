"""Aspect-ratio buckets: the Lens resolutions, which bucket an image goes to, how it is fitted, and batching.

Lens was trained on nine aspects from 1:2 to 2:1 at base resolutions 1024 and 1440. Images are trained at the
bucket nearest their own shape (so little is cropped), and every batch holds images of one bucket only.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator

from PIL import Image

STEP = 16  # the VAE downsamples by 8 and the transformer packs 2x2 latents: sides are multiples of 16

# The reference tables (upstream LensPipeline RESOLUTION_BUCKETS), as aspect name (width:height) -> (height, width).
REFERENCE_BUCKETS = {
    1024: {
        "1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864), "1:1": (1024, 1024),
        "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376), "2:1": (736, 1472),
    },
    1440: {
        "1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216), "1:1": (1440, 1440),
        "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936), "2:1": (1040, 2080),
    },
}
DERIVATION_BASE = 1024


@dataclass(frozen=True)
class Bucket:
    """A training size: `width` x `height` pixels, its aspect name (width:height) and the base resolution of the
    table it belongs to (None for a bucket made by hand, e.g. a fixed square size)."""

    width: int
    height: int
    aspect: str
    resolution: int | None = None

    @property
    def log_aspect(self) -> float:
        """The log of the actual width/height ratio."""
        return math.log(self.width / self.height)

    @property
    def nominal_ratio(self) -> float:
        """The width/height ratio the aspect name stands for ("16:9" -> 1.78)."""
        width, height = (int(part) for part in self.aspect.split(":"))
        return width / height

    def __str__(self) -> str:
        return f"{self.width}x{self.height} ({self.aspect})"


# --- the tables ---------------------------------------------------------------------------------------------------


def bucket_table(resolution: int) -> list[Bucket]:
    """The buckets of one base resolution, tallest first.

    1024 and 1440 are the reference tables. Other resolutions (positive multiples of 16) are derived from the
    1024 table by `derived_bucket_table`.
    """
    check_resolution(resolution)
    return list(cached_table(resolution))


@functools.lru_cache(maxsize=None)
def cached_table(resolution: int) -> tuple[Bucket, ...]:
    # assign_bucket looks the tables up once per image
    if resolution in REFERENCE_BUCKETS:
        return tuple(
            Bucket(width=width, height=height, aspect=aspect, resolution=resolution)
            for aspect, (height, width) in REFERENCE_BUCKETS[resolution].items()
        )
    return tuple(derived_bucket_table(resolution))


def check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % STEP:
        raise ValueError(f"resolution must be a positive multiple of {STEP}, not {resolution!r}")


def derived_bucket_table(resolution: int) -> list[Bucket]:
    """Buckets for any resolution, shaped like the 1024 reference table.

    Rule: the short side is the 1024 table's short side scaled by resolution/1024, rounded to a multiple of 16;
    the long side is that short side times the 1024 table's long/short ratio, rounded to a multiple of 16.
    It gives the 1024 table exactly and the 1440 table within one 16-px step (9:16 and 16:9: long side 1952,
    not 1936), which is why the two reference tables are used as they are. The ratio never passes 2:1.
    """
    check_resolution(resolution)
    buckets = []
    for aspect, (height, width) in REFERENCE_BUCKETS[DERIVATION_BASE].items():
        short_side, long_side = sorted((height, width))
        new_short = round_to_step(Fraction(short_side * resolution, DERIVATION_BASE))
        new_long = round_to_step(Fraction(new_short * long_side, short_side))
        new_width, new_height = (new_long, new_short) if width > height else (new_short, new_long)
        buckets.append(Bucket(width=new_width, height=new_height, aspect=aspect, resolution=resolution))
    return without_duplicate_sizes(buckets)


def round_to_step(value: Fraction) -> int:
    """Nearest multiple of STEP (halves go up), at least STEP."""
    return max(STEP, STEP * math.floor(value / STEP + Fraction(1, 2)))


def without_duplicate_sizes(buckets: list[Bucket]) -> list[Bucket]:
    """At tiny resolutions two aspects can round to one size; keep the one whose name fits that size best."""
    best: dict[tuple[int, int], Bucket] = {}
    for bucket in buckets:
        size = (bucket.width, bucket.height)
        if size not in best or name_error(bucket) < name_error(best[size]):
            best[size] = bucket
    return [bucket for bucket in buckets if best[(bucket.width, bucket.height)] is bucket]


def name_error(bucket: Bucket) -> float:
    return abs(bucket.log_aspect - math.log(bucket.nominal_ratio))


# --- choosing a bucket and fitting an image to it -----------------------------------------------------------------


def assign_bucket(width: int, height: int, resolutions: list[int], max_upscale: float = 1.0) -> Bucket | None:
    """The bucket an image of `width` x `height` trains at, or None when it is too small for every resolution.

    The aspect is the one nearest the image's (in log aspect); the resolution is the largest whose bucket needs
    at most `max_upscale` scaling to cover it (1.0: never enlarge).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width}x{height}")
    if not resolutions:
        raise ValueError("resolutions must name at least one base resolution")
    for resolution in resolutions:
        check_resolution(resolution)
    image_log_aspect = math.log(width / height)
    for resolution in sorted(set(resolutions), reverse=True):
        bucket = min(cached_table(resolution), key=lambda candidate: abs(candidate.log_aspect - image_log_aspect))
        if cover_scale(width, height, bucket) <= max_upscale + 1e-9:
            return bucket
    return None


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """How much an image must be scaled so that it covers the bucket on both sides."""
    return max(bucket.width / width, bucket.height / height)


def fit_to_bucket(
    image: Image.Image, bucket: Bucket, *, crop: str = "center", flip: bool = False, crop_seed: int | None = None
) -> Image.Image:
    """Resize (Lanczos) so the image just covers the bucket, crop to the bucket size, optionally mirror.

    crop="center" takes the middle; crop="random" a random offset drawn from `crop_seed` (same seed, same crop).
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    resized = resize_to_cover(image, bucket)
    spare_x, spare_y = resized.width - bucket.width, resized.height - bucket.height
    if crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        rng = random.Random(crop_seed)
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    fitted = resized.crop((left, top, left + bucket.width, top + bucket.height))
    if flip:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return fitted


def resize_to_cover(image: Image.Image, bucket: Bucket) -> Image.Image:
    scale = cover_scale(image.width, image.height, bucket)
    # max(): rounding must never leave the covering side a pixel short of the bucket
    size = (max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


# --- batching -----------------------------------------------------------------------------------------------------


class BucketBatchSampler:
    """Batches of item indices, each batch from one bucket, in an order fixed by (seed, epoch).

    Iterating yields the rest of the current epoch from the current position; a pass that runs to the end moves
    on to the next epoch. `set_epoch` jumps to the start of another epoch (the current one: no change, so a
    resumed run's loop may call it as usual). `state_dict` / `load_state_dict` carry the epoch and the number of
    batches consumed, so an interrupted run continues with exactly the batches it would have seen. (Behind a
    prefetching DataLoader the sampler runs ahead of training: save the number of batches actually trained as
    "batches_consumed".)
    """

    def __init__(self, buckets_of_items: list[Bucket], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        missing = [index for index, bucket in enumerate(buckets_of_items) if bucket is None]
        if missing:
            raise ValueError(f"items {missing[:10]} have no bucket; leave out images that fit no bucket first")
        self.buckets_of_items = list(buckets_of_items)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_consumed = 0

    def indices_by_bucket(self) -> dict[Bucket, list[int]]:
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets_of_items):
            groups[bucket].append(index)
        return groups

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """Every batch of one epoch, in order: indices shuffled within each bucket, then the batches shuffled."""
        # a str seed is hashed with sha512 by random.Random: stable across runs and Python versions
        rng = random.Random(f"bucket-batches:{self.seed}:{epoch}")
        batches = []
        for indices in self.indices_by_bucket().values():
            indices = list(indices)
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_consumed = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_of_epoch(self.epoch)
        while self.batches_consumed < len(batches):
            batch = batches[self.batches_consumed]
            # counted when handed out, so a state saved while this batch trains resumes after it
            self.batches_consumed += 1
            yield batch
        self.epoch += 1
        self.batches_consumed = 0

    def __len__(self) -> int:
        """Batches in one whole epoch."""
        total = 0
        for indices in self.indices_by_bucket().values():
            full, rest = divmod(len(indices), self.batch_size)
            total += full + (1 if rest and not self.drop_last else 0)
        return total

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_items": len(self.buckets_of_items),
        }

    def load_state_dict(self, state: dict) -> None:
        # the saved position only means the same thing for the same data, batch size and seed
        current_values = {"seed": self.seed, "batch_size": self.batch_size, "num_items": len(self.buckets_of_items)}
        for key, current in current_values.items():
            if key in state and state[key] != current:
                raise ValueError(f"cannot resume the batch order: saved {key} {state[key]}, now {current}")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])


# --- reporting ----------------------------------------------------------------------------------------------------


def bucket_histogram(assignments: Iterable[Bucket | None]) -> list[tuple[Bucket, int]]:
    """How many images each bucket got, widest aspect first (then larger resolution first). None is not counted."""
    counts = Counter(bucket for bucket in assignments if bucket is not None)
    # by the aspect name: rounding makes 16:9 at 1024 a little wider than 16:9 at 1440
    return sorted(counts.items(), key=lambda entry: (-entry[0].nominal_ratio, -(entry[0].resolution or 0)))


def format_histogram(histogram: list[tuple[Bucket, int]], unassigned: int = 0) -> str:
    """A small text table of `bucket_histogram`'s result; `unassigned` counts images too small for any bucket."""
    total = sum(count for _, count in histogram) + unassigned
    rows = [("aspect", "size (w x h)", "base", "images", "share")]
    for bucket, count in histogram:
        size = f"{bucket.width}x{bucket.height}"
        base = str(bucket.resolution) if bucket.resolution is not None else "-"
        rows.append((bucket.aspect, size, base, str(count), percent(count, total)))
    if unassigned:
        rows.append(("-", "too small", "-", str(unassigned), percent(unassigned, total)))
    rows.append(("total", "", "", str(total), ""))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    text_columns = 3  # aspect, size and base are left-aligned; the numbers right-aligned
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def percent(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else ""
