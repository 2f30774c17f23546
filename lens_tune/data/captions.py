"""Caption rules: which text an image is trained with, the trigger word, and tag shuffling.

All functions are pure (shuffles take their randomness from an explicit seed), so the captions can be
computed once, cached with the text features, and reproduced exactly.
"""

from __future__ import annotations

import random
import re

from lens_tune.errors import DatasetError

TRIGGER_PLACEHOLDER = "[trigger]"
TRIGGER_MODES = ("replace", "prepend")


def resolve_caption(
    raw: str | None,
    *,
    instance_prompt: str | None,
    trigger: str | None,
    trigger_mode: str = "replace",
    use_sidecars: bool = True,
    origin: str = "an image",
) -> str:
    """The caption one image is trained with.

    The image's own caption (when `use_sidecars` and not empty), else the instance prompt. Every "[trigger]"
    becomes the trigger word; with trigger_mode "prepend" a caption that does not yet contain the trigger word
    starts with "<trigger>, ". `origin` names the image in error messages.
    """
    if trigger_mode not in TRIGGER_MODES:
        raise ValueError(f"trigger_mode must be one of {TRIGGER_MODES}, not {trigger_mode!r}")
    trigger = (trigger or "").strip() or None
    caption = choose_caption(raw, instance_prompt, use_sidecars, origin)
    caption = fill_trigger_placeholders(caption, trigger, origin)
    if trigger_mode == "prepend" and trigger is not None and not contains_word(caption, trigger):
        caption = f"{trigger}, {caption}"
    return caption


def choose_caption(raw: str | None, instance_prompt: str | None, use_sidecars: bool, origin: str) -> str:
    own = (raw or "").strip() if use_sidecars else ""
    if own:
        return own
    fallback = (instance_prompt or "").strip()
    if fallback:
        return fallback
    if use_sidecars:
        fix = "add a caption file next to it (same name, .txt) or set an instance prompt (dreambooth.instance_prompt)"
    else:
        fix = (
            "the dataset's own captions are switched off (use_captions: false), "
            "so set an instance prompt (dreambooth.instance_prompt)"
        )
    raise DatasetError(f"{origin} has no caption: {fix}")


def fill_trigger_placeholders(caption: str, trigger: str | None, origin: str) -> str:
    if TRIGGER_PLACEHOLDER not in caption:
        return caption
    if trigger is None:
        raise DatasetError(
            f"the caption of {origin} ({caption!r}) uses the {TRIGGER_PLACEHOLDER} placeholder but no trigger word "
            "is set; set data.trigger, or remove the placeholder"
        )
    return caption.replace(TRIGGER_PLACEHOLDER, trigger)


def contains_word(text: str, word: str) -> bool:
    """True when `word` appears in `text` as a whole word ("sks" is in "a sks dog", not in "asks")."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    """Shuffle the comma-separated tags of `caption`, leaving the first `keep_tokens` tags in place."""
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be 0 or more, not {keep_tokens}")
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def caption_variants(caption: str, *, shuffle: bool, num_shuffles: int, keep_tokens: int, seed: int) -> list[str]:
    """The captions training draws from for one image: the caption itself, then (with `shuffle`) up to
    `num_shuffles` seeded tag shuffles. Duplicates are dropped (order kept), so a caption with few tags gets
    fewer variants.
    """
    if num_shuffles < 0:
        raise ValueError(f"num_shuffles must be 0 or more, not {num_shuffles}")
    variants = [caption]
    if not shuffle:
        return variants
    seen = {", ".join(split_tags(caption))}
    # the caption is part of the seed so that two images with the same tag count are not shuffled alike;
    # a str seed is hashed with sha512 by random.Random, so it is stable across runs and machines
    rng = random.Random(f"{seed}:{caption}")
    for _ in range(num_shuffles):
        shuffled = shuffle_tags(caption, rng, keep_tokens)
        if shuffled not in seen:
            seen.add(shuffled)
            variants.append(shuffled)
    return variants
