"""Aspect-ratio buckets: the Lens tables, bucket choice, fitting an image, batching and the histogram."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lens_tune.data.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    bucket_histogram,
    bucket_table,
    derived_bucket_table,
    fit_to_bucket,
    format_histogram,
)

# height x width, as the reference lists them
REFERENCE_1024 = [
    (1472, 736), (1376, 768), (1248, 832), (1152, 864), (1024, 1024), (864, 1152), (832, 1248), (768, 1376), (736, 1472)
]
REFERENCE_1440 = [
    (2080, 1040), (1936, 1088), (1760, 1168), (1616, 1216), (1440, 1440),
    (1216, 1616), (1168, 1760), (1088, 1936), (1040, 2080),
]
ASPECTS = ["1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1"]


def sizes(buckets):
    return [(bucket.height, bucket.width) for bucket in buckets]


def bucket_named(resolution, aspect):
    return next(bucket for bucket in bucket_table(resolution) if bucket.aspect == aspect)


# --- tables -------------------------------------------------------------------------------------------------------


def test_reference_tables_are_exact():
    assert sizes(bucket_table(1024)) == REFERENCE_1024
    assert sizes(bucket_table(1440)) == REFERENCE_1440
    assert [bucket.aspect for bucket in bucket_table(1024)] == ASPECTS
    assert {bucket.resolution for bucket in bucket_table(1440)} == {1440}


def test_derived_rule_reproduces_1024_and_1440_within_one_step():
    assert sizes(derived_bucket_table(1024)) == REFERENCE_1024
    derived = sizes(derived_bucket_table(1440))
    differences = [(abs(h - rh), abs(w - rw)) for (h, w), (rh, rw) in zip(derived, REFERENCE_1440)]
    assert all(dh <= 16 and dw <= 16 for dh, dw in differences)
    off = [aspect for aspect, difference in zip(ASPECTS, differences) if difference != (0, 0)]
    assert off == ["9:16", "16:9"]  # long side 1952 instead of 1936; the reference table itself is used for 1440


@pytest.mark.parametrize("resolution", [16, 32, 64, 256, 512, 768, 1024, 1280, 1440, 2048])
def test_every_table_has_sides_of_16_and_aspects_within_2_to_1(resolution):
    table = bucket_table(resolution)
    assert len({(bucket.width, bucket.height) for bucket in table}) == len(table)
    for bucket in table:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0
        assert 0.5 <= bucket.width / bucket.height <= 2.0
        assert bucket.resolution == resolution
    if resolution >= 256:
        assert [bucket.aspect for bucket in table] == ASPECTS
        # area close to resolution squared (a 16-px step weighs more at small resolutions)
        tolerance = 0.06 if resolution >= 1024 else 0.15
        for bucket in table:
            assert abs(bucket.width * bucket.height / resolution**2 - 1) < tolerance


def test_every_resolution_up_to_4096_keeps_the_bounds():
    for resolution in range(16, 4097, 16):
        for bucket in bucket_table(resolution):
            assert bucket.width % 16 == 0 and bucket.height % 16 == 0
            assert 0.5 <= bucket.width / bucket.height <= 2.0


@pytest.mark.parametrize("bad", [0, -16, 1000, 1025, 512.0, True, "1024"])
def test_resolution_must_be_a_positive_multiple_of_16(bad):
    with pytest.raises(ValueError, match="positive multiple of 16"):
        bucket_table(bad)


# --- assign_bucket ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "aspect"),
    [(2000, 2000, "1:1"), (3000, 2000, "3:2"), (2000, 3000, "2:3"), (4000, 2250, "16:9"), (2250, 4000, "9:16"),
     (3000, 1000, "2:1"), (1000, 3000, "1:2"), (4000, 3000, "4:3"), (3000, 4000, "3:4"), (2100, 2000, "1:1")],
)
def test_assign_picks_the_nearest_aspect(width, height, aspect):
    assert assign_bucket(width, height, [1024]).aspect == aspect


def test_assign_is_nearest_in_log_aspect():
    for width in range(1000, 4001, 50):
        chosen = assign_bucket(width, 1000, [1024], max_upscale=10)
        distance = lambda bucket: abs(math.log(bucket.width / bucket.height) - math.log(width / 1000))  # noqa: E731
        assert distance(chosen) == min(distance(bucket) for bucket in bucket_table(1024))


def test_assign_never_upscales_past_the_limit():
    assert assign_bucket(1024, 1024, [1024]) == bucket_named(1024, "1:1")
    assert assign_bucket(1000, 1000, [1024]) is None  # would need 1.024x
    assert assign_bucket(1000, 1000, [1024], max_upscale=1.05) == bucket_named(1024, "1:1")
    assert assign_bucket(600, 600, [1024], max_upscale=1.5) is None
    # a wide image must cover the 16:9 bucket on both sides
    assert assign_bucket(1376, 760, [1024]) is None
    assert assign_bucket(1376, 774, [1024]) == bucket_named(1024, "16:9")


def test_assign_prefers_the_largest_resolution_that_fits():
    resolutions = [512, 1024, 1440]
    assert assign_bucket(3000, 3000, resolutions).resolution == 1440
    assert assign_bucket(1200, 1200, resolutions).resolution == 1024
    assert assign_bucket(700, 700, resolutions).resolution == 512
    assert assign_bucket(300, 300, resolutions) is None
    assert assign_bucket(1200, 1200, [1024, 1440], max_upscale=1.25).resolution == 1440
    assert assign_bucket(1200, 1200, [1440, 1024, 1024]).resolution == 1024  # order and repeats do not matter


def test_assign_rejects_bad_sizes():
    with pytest.raises(ValueError):
        assign_bucket(0, 100, [1024])
    with pytest.raises(ValueError):
        assign_bucket(100, 100, [])


# --- fit_to_bucket ------------------------------------------------------------------------------------------------


def striped(width, height):
    """Columns coloured by x: red channel = x (mod 256), green = y (mod 256)."""
    x = np.arange(width)[None, :].repeat(height, axis=0)
    y = np.arange(height)[:, None].repeat(width, axis=1)
    pixels = np.stack([x % 256, y % 256, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


SMALL = Bucket(width=64, height=32, aspect="2:1", resolution=48)


def test_fit_output_size_is_exact():
    for width, height in [(64, 32), (200, 50), (50, 200), (129, 65), (1000, 999), (33, 17)]:
        fitted = fit_to_bucket(Image.new("RGB", (width, height)), SMALL)
        assert fitted.size == (64, 32)


def test_center_crop_takes_the_middle():
    image = striped(200, 32)  # same height as the bucket: no resize, only a horizontal crop
    fitted = np.asarray(fit_to_bucket(image, SMALL, crop="center"))
    assert fitted[0, 0, 0] == (200 - 64) // 2 and fitted[0, -1, 0] == (200 - 64) // 2 + 63
    tall = striped(64, 100)
    fitted = np.asarray(fit_to_bucket(tall, SMALL, crop="center"))
    assert fitted[0, 0, 1] == (100 - 32) // 2


def test_resize_keeps_the_aspect_before_cropping():
    image = Image.new("RGB", (400, 100), (0, 0, 0))
    image.paste((255, 255, 255), (150, 0, 250, 100))  # a white band in the middle quarter
    fitted = np.asarray(fit_to_bucket(image, SMALL).convert("L"))
    # 400x100 -> 128x32, centre 64 px: the band (48..80 after resizing) spans columns 16..48
    assert fitted[16, 20] > 200 and fitted[16, 44] > 200 and fitted[16, 5] < 50 and fitted[16, 60] < 50


def test_flip_mirrors():
    image = striped(64, 32)
    plain = np.asarray(fit_to_bucket(image, SMALL))
    flipped = np.asarray(fit_to_bucket(image, SMALL, flip=True))
    assert np.array_equal(flipped, plain[:, ::-1])


def test_random_crop_is_deterministic_per_seed():
    image = striped(300, 32)
    crops = {seed: np.asarray(fit_to_bucket(image, SMALL, crop="random", crop_seed=seed)) for seed in range(8)}
    assert np.array_equal(crops[3], np.asarray(fit_to_bucket(image, SMALL, crop="random", crop_seed=3)))
    assert len({int(crop[0, 0, 0]) for crop in crops.values()}) > 1
    assert all(0 <= int(crop[0, 0, 0]) <= 300 - 64 for crop in crops.values())
    with pytest.raises(ValueError, match="crop"):
        fit_to_bucket(image, SMALL, crop="top")


# --- BucketBatchSampler -------------------------------------------------------------------------------------------


def assignments(counts: dict[str, int]) -> list[Bucket]:
    items = []
    for aspect, count in counts.items():
        items += [bucket_named(1024, aspect)] * count
    # interleave so that bucket membership is not just a range of indices
    return [items[index] for index in np.random.default_rng(0).permutation(len(items))]


def test_sampler_covers_every_index_once_in_single_bucket_batches():
    buckets = assignments({"1:1": 10, "16:9": 7, "2:3": 3})
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert sorted(index for batch in batches for index in batch) == list(range(20))
    assert all(len({buckets[index] for index in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 4 for batch in batches)


def test_sampler_drop_last():
    buckets = assignments({"1:1": 10, "16:9": 7, "2:3": 3})
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=1, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 1
    assert all(len(batch) == 4 for batch in batches)


def test_sampler_order_depends_on_seed_and_epoch_only():
    buckets = assignments({"1:1": 12, "3:4": 9})
    first = list(BucketBatchSampler(buckets, batch_size=3, seed=5))
    assert first == list(BucketBatchSampler(buckets, batch_size=3, seed=5))
    assert first != list(BucketBatchSampler(buckets, batch_size=3, seed=6))
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=5)
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert second_epoch != first
    # not only the batch order changes: the batches are regrouped
    assert sorted(map(sorted, second_epoch)) != sorted(map(sorted, first))
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(sampler) == second_epoch  # the pass moved on to epoch 1


def test_sampler_resumes_mid_epoch_exactly():
    buckets = assignments({"1:1": 11, "16:9": 6, "1:2": 5})
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3)
    sampler.set_epoch(4)
    full_epoch = sampler.batches_of_epoch(4)
    seen = []
    for batch in sampler:
        seen.append(batch)
        if len(seen) == 5:
            state = sampler.state_dict()
            break
    assert state["epoch"] == 4 and state["batches_consumed"] == 5
    resumed = BucketBatchSampler(buckets, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert seen + rest == full_epoch
    assert len(rest) == len(resumed) - 5
    # a finished pass moves on to the next epoch, so a state saved then resumes there
    assert resumed.state_dict()["epoch"] == 5 and resumed.state_dict()["batches_consumed"] == 0
    assert list(resumed) == resumed.batches_of_epoch(5)


def test_sampler_set_epoch_with_the_current_epoch_keeps_a_resumed_position():
    buckets = assignments({"1:1": 8})
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    sampler.load_state_dict({"epoch": 2, "batches_consumed": 3})
    sampler.set_epoch(2)  # what a training loop does at the top of every epoch
    assert list(sampler) == sampler.batches_of_epoch(2)[3:]
    sampler.set_epoch(7)
    assert list(sampler) == sampler.batches_of_epoch(7)


def test_sampler_refuses_a_state_from_other_data():
    buckets = assignments({"1:1": 4})
    state = BucketBatchSampler(buckets, batch_size=2, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        BucketBatchSampler(buckets[:3], batch_size=2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(buckets, batch_size=2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="no bucket"):
        BucketBatchSampler([*buckets, None], batch_size=2, seed=3)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(buckets, batch_size=0, seed=3)


# --- histogram ----------------------------------------------------------------------------------------------------


def test_histogram_widest_first_and_table_text():
    square, wide, tall = bucket_named(1024, "1:1"), bucket_named(1024, "16:9"), bucket_named(1024, "1:2")
    big_wide = bucket_named(1440, "16:9")
    histogram = bucket_histogram([square, wide, tall, square, None, big_wide, wide])
    assert histogram == [(big_wide, 1), (wide, 2), (square, 2), (tall, 1)]
    text = format_histogram(histogram, unassigned=1)
    lines = text.splitlines()
    assert lines[0].split() == ["aspect", "size", "(w", "x", "h)", "base", "images", "share"]
    assert lines[1].split() == ["16:9", "1936x1088", "1440", "1", "14.3%"]
    assert lines[2].split() == ["16:9", "1376x768", "1024", "2", "28.6%"]
    assert "too small" in lines[-2] and lines[-1].split() == ["total", "7"]
    assert format_histogram([]).splitlines()[-1].split() == ["total", "0"]


def test_hand_made_buckets_have_no_resolution():
    square = Bucket(width=512, height=512, aspect="1:1")
    assert square.resolution is None
    histogram = bucket_histogram([square, bucket_named(1024, "1:1"), square])
    assert histogram == [(bucket_named(1024, "1:1"), 1), (square, 2)]
    assert format_histogram(histogram).splitlines()[2].split() == ["1:1", "512x512", "-", "2", "66.7%"]


def test_histogram_counts_match():
    buckets = assignments({"1:1": 5, "4:3": 3})
    assert Counter(dict(bucket_histogram(buckets))) == Counter(buckets)
