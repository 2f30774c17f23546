"""Caption rules: own caption or instance prompt, the trigger word, tag shuffling and the cached variants."""

from __future__ import annotations

import random

import pytest

from lens_tune.data.captions import caption_variants, resolve_caption, shuffle_tags
from lens_tune.errors import DatasetError


def resolve(raw, **options):
    settings = dict(instance_prompt=None, trigger=None, trigger_mode="replace", origin="/data/cat.png")
    settings.update(options)
    return resolve_caption(raw, **settings)


# --- resolve_caption ----------------------------------------------------------------------------------------------


def test_own_caption_is_used_and_stripped():
    assert resolve("  a cat on a sofa \n", instance_prompt="a photo") == "a cat on a sofa"


def test_instance_prompt_when_the_caption_is_missing_or_empty():
    assert resolve(None, instance_prompt="a photo of sks dog") == "a photo of sks dog"
    assert resolve("   ", instance_prompt="a photo of sks dog") == "a photo of sks dog"


def test_use_sidecars_off_ignores_the_own_caption():
    assert resolve("a cat", instance_prompt="a photo", use_sidecars=False) == "a photo"


def test_no_caption_at_all_says_which_image_and_how_to_fix():
    with pytest.raises(DatasetError) as error:
        resolve(None)
    message = str(error.value)
    assert "/data/cat.png has no caption" in message
    assert ".txt" in message and "instance prompt" in message
    with pytest.raises(DatasetError, match=r"own captions are switched off \(use_captions: false\)"):
        resolve("a cat", use_sidecars=False)


def test_trigger_placeholders_are_replaced():
    caption = "[trigger] sitting, a photo of [trigger]"
    assert resolve(caption, trigger="sks") == "sks sitting, a photo of sks"
    assert resolve(None, instance_prompt="a photo of [trigger] dog", trigger="ohwx") == "a photo of ohwx dog"


def test_placeholder_without_a_trigger_is_an_error():
    with pytest.raises(DatasetError, match=r"/data/cat.png .*\[trigger\] placeholder but no trigger word"):
        resolve("a photo of [trigger]")
    with pytest.raises(DatasetError, match="no trigger word"):
        resolve("a photo of [trigger]", trigger="   ")


def test_prepend_adds_the_trigger_once():
    assert resolve("a dog on grass", trigger="sks", trigger_mode="prepend") == "sks, a dog on grass"
    assert resolve("a sks dog on grass", trigger="sks", trigger_mode="prepend") == "a sks dog on grass"
    assert resolve("[trigger] dog", trigger="sks", trigger_mode="prepend") == "sks dog"
    # a longer word that merely contains the trigger does not count
    assert resolve("he asks for a dog", trigger="sks", trigger_mode="prepend") == "sks, he asks for a dog"


def test_replace_mode_does_not_prepend():
    assert resolve("a dog on grass", trigger="sks", trigger_mode="replace") == "a dog on grass"


def test_unicode_captions_and_triggers():
    assert resolve("一只猫, 在沙发上", trigger="ж铃", trigger_mode="prepend") == "ж铃, 一只猫, 在沙发上"
    assert resolve("photo de [trigger] café", trigger="Zoë") == "photo de Zoë café"
    assert resolve("Zoë au café", trigger="Zoë", trigger_mode="prepend") == "Zoë au café"


def test_unknown_trigger_mode():
    with pytest.raises(ValueError, match="trigger_mode"):
        resolve("a cat", trigger="sks", trigger_mode="append")


# --- shuffle_tags -------------------------------------------------------------------------------------------------


def test_shuffle_keeps_the_first_tags_and_every_tag():
    caption = "sks, 1girl, red hair, smiling, outdoors, night"
    for seed in range(20):
        shuffled = shuffle_tags(caption, random.Random(seed), keep_tokens=2)
        tags = shuffled.split(", ")
        assert tags[:2] == ["sks", "1girl"]
        assert sorted(tags) == sorted(caption.split(", "))


def test_shuffle_normalises_spacing_and_drops_empty_tags():
    assert shuffle_tags(" a ,b,, c ", random.Random(0), keep_tokens=3) == "a, b, c"
    assert shuffle_tags("single tag", random.Random(0)) == "single tag"
    assert shuffle_tags("a, b", random.Random(0), keep_tokens=5) == "a, b"


def test_shuffle_is_deterministic_and_does_shuffle():
    caption = ", ".join(f"tag{index}" for index in range(10))
    first = shuffle_tags(caption, random.Random(42))
    assert first == shuffle_tags(caption, random.Random(42))
    assert len({shuffle_tags(caption, random.Random(seed)) for seed in range(10)}) > 1
    with pytest.raises(ValueError, match="keep_tokens"):
        shuffle_tags(caption, random.Random(0), keep_tokens=-1)


def test_shuffle_unicode_tags():
    caption = "猫, ねこ, кошка, gato, chat"
    shuffled = shuffle_tags(caption, random.Random(3), keep_tokens=1)
    assert shuffled.startswith("猫, ") and sorted(shuffled.split(", ")) == sorted(caption.split(", "))


# --- caption_variants ---------------------------------------------------------------------------------------------


def test_variants_without_shuffle_are_the_caption_alone():
    assert caption_variants("a, b, c", shuffle=False, num_shuffles=5, keep_tokens=0, seed=0) == ["a, b, c"]


def test_variants_start_with_the_caption_and_are_deterministic():
    caption = "sks, one, two, three, four, five"
    variants = caption_variants(caption, shuffle=True, num_shuffles=4, keep_tokens=1, seed=7)
    assert variants[0] == caption
    assert 2 <= len(variants) <= 5 and len(set(variants)) == len(variants)
    assert all(variant.startswith("sks, ") for variant in variants)
    assert variants == caption_variants(caption, shuffle=True, num_shuffles=4, keep_tokens=1, seed=7)
    assert variants != caption_variants(caption, shuffle=True, num_shuffles=4, keep_tokens=1, seed=8)


def test_variants_are_deduplicated_in_order():
    # two tags have only two orders: the caption and its swap, however many shuffles are asked for
    variants = caption_variants("a, b", shuffle=True, num_shuffles=50, keep_tokens=0, seed=0)
    assert variants == ["a, b", "b, a"]
    # spacing differences are not new variants
    assert caption_variants("a,b", shuffle=True, num_shuffles=50, keep_tokens=1, seed=0) == ["a,b"]
    assert caption_variants("only", shuffle=True, num_shuffles=3, keep_tokens=0, seed=0) == ["only"]


def permutation(shuffled: str, original: str) -> list[int]:
    return [original.split(", ").index(tag) for tag in shuffled.split(", ")]


def test_variants_differ_between_captions_with_the_same_seed():
    # the caption is part of the seed: images with the same number of tags are not all shuffled alike
    first, second = "a, b, c, d, e, f", "u, v, w, x, y, z"
    first_shuffle = caption_variants(first, shuffle=True, num_shuffles=1, keep_tokens=0, seed=1)[1]
    second_shuffle = caption_variants(second, shuffle=True, num_shuffles=1, keep_tokens=0, seed=1)[1]
    assert permutation(first_shuffle, first) != permutation(second_shuffle, second)


def test_variants_reject_negative_counts():
    with pytest.raises(ValueError, match="num_shuffles"):
        caption_variants("a, b", shuffle=True, num_shuffles=-1, keep_tokens=0, seed=0)
