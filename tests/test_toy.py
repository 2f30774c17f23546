"""The toy world, lens-toy and its evaluator: determinism, vocabulary, the shipped weights and what they can do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens_tune.toy import components, evaluator_dir, subjects, toy_pipeline_dir, world
from lens_tune.toy.evaluator import ToyEvaluator, accuracy, pixels

EXAMPLES = Path(__file__).parents[1] / "examples"
HELD_OUT = range(900_000, 900_200)  # far past the build's training and held-out indices


# ---------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_world_other_seed_other_world():
    first = [world.render(world.scene(0, i)) for i in range(20)]
    again = [world.render(world.scene(0, i)) for i in range(20)]
    other = [world.render(world.scene(1, i)) for i in range(20)]
    assert np.array_equal(world.to_array(first), world.to_array(again))
    assert not np.array_equal(world.to_array(first), world.to_array(other))
    assert [world.caption_variants(world.scene(0, i), 0, i) for i in range(20)] == [
        world.caption_variants(world.scene(0, i), 0, i) for i in range(20)
    ]


def test_labels_match_the_pixels():
    for i in range(40):
        s = world.scene(3, i)
        image, mask = world.render(s, with_mask=True)
        coverage = np.asarray(mask, dtype=float) / 255
        ys, xs = np.nonzero(coverage > 0.5)
        # the object sits where its position says (within the jitter plus the shape's own asymmetry)
        assert abs(xs.mean() - world.POSITIONS[s.position][0]) < 6 and abs(ys.mean() - world.POSITIONS[s.position][1]) < 6
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert extent >= 24 if s.size == "large" else extent <= 21
        inside = np.asarray(image)[coverage > 0.99]
        assert np.abs(inside - np.array(world.COLOURS[s.colour])).max() <= 1  # base objects are plain


def test_captions_name_the_labels_in_a_fixed_order():
    s = world.Scene("star", "red", "small", "bottom left", "blue", "striped", 20, 44, 9)
    assert world.caption(s) == "a small red star on a striped blue background, bottom left"
    assert world.caption(s, {"size": False, "pattern": False, "position": False}) == "a red star on a blue background"
    assert world.caption(s, {"colour": False, "shape": False, "pattern": False, "background": False}) == (
        "a small shape, bottom left"
    )
    assert world.caption(s, {"size": False}, subject="sks") == "a sks star on a striped blue background, bottom left"
    wide = [world.scene(0, i, wide=True) for i in range(300)]
    assert {s.texture for s in wide} == set(world.TEXTURES) and {s.shape for s in wide} == set(world.ALL_SHAPES)
    assert {world.scene(0, i).texture for i in range(300)} == {"plain"}


def test_subject_folders_are_what_the_generator_writes(tmp_path):
    from lens_tune.toy.subjects import SUBJECTS, write_subject

    for subject in SUBJECTS.values():
        written = write_subject(subject, tmp_path / subject.folder)
        for path in written:
            shipped = EXAMPLES / subject.folder / path.name
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped)))
            assert path.with_suffix(".txt").read_text() == shipped.with_suffix(".txt").read_text()
            assert "[trigger]" in path.with_suffix(".txt").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and text encoder
# ---------------------------------------------------------------------------------------------------------------
def test_every_world_word_is_one_token_and_captions_have_distinct_features():
    from lens_tune.model.text_encoder import chat_prefix_length, encode_text, render_lens_chat

    tokenizer = components.build_tokenizer()
    chat = tokenizer(render_lens_chat(tokenizer, "a small red star on a striped blue background, bottom left"))
    assert tokenizer.unk_token_id not in chat.input_ids  # the chat template's words too
    for word in world.VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word

    encoder = components.build_text_encoder(tokenizer, seed=0)
    captions = sorted({world.caption_variants(world.scene(0, i), 0, i)[1] for i in range(40)})
    features, mask = encode_text(tokenizer, encoder, captions, [1, 3], 512, chat_prefix_length(tokenizer), "cpu")
    flat = torch.cat([f * mask[..., None] for f in features], dim=-1).flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(len(captions)) * 1e9
    assert distances.min() > 1.0  # a frozen random encoder still tells every caption apart


# ---------------------------------------------------------------------------------------------------------------
# The shipped weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluator():
    return ToyEvaluator.load(evaluator_dir())


@pytest.fixture(scope="module")
def pipe():
    from lens_tune import LensPipeline
    from lens_tune.model.sources import locate_model

    pipe = LensPipeline.from_pretrained(locate_model("toy"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_is_a_lens_pipeline_folder(pipe):
    folder = toy_pipeline_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "LensTransformer2DModel"] and index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert dict(pipe.transformer.config) | components.TRANSFORMER_CONFIG == dict(pipe.transformer.config)
    assert pipe.vae.bn.running_var.min() > 0 and pipe.vae.bn.running_mean.abs().max() > 0  # measured, not defaults
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    total = sum(p.stat().st_size for p in folder.parent.rglob("*") if p.is_file())
    assert total < 16 * 2**20


def test_evaluator_reads_held_out_pictures(evaluator):
    """Measured with the shipped evaluator: the base world 0.99-1.0 on every label; the wide world 0.97 shape,
    0.88 colour (the second colour of a textured object competes), 0.77 texture, the rest 0.99-1.0."""
    floors = {False: {}, True: {"colour": 0.8, "texture": 0.7}}
    for wide in (False, True):
        scenes = [world.scene(0, i, wide=wide) for i in HELD_OUT]
        got = accuracy(evaluator.predict(pixels([world.render(s) for s in scenes])), [s.labels() for s in scenes])
        for label, value in got.items():
            assert value >= floors[wide].get(label, 0.9), (wide, got)


def test_base_model_draws_what_the_caption_says(pipe, evaluator):
    """lens-toy v1 draws colour, size, position, background and pattern as asked, and shapes poorly (blobs; 0.5 on
    these 24 captions, 0.32 on the build's 100: better than the 0.2 of a guess among five)."""
    scenes = [world.scene(0, i) for i in HELD_OUT[:24]]
    images = [pipe(world.caption(s), height=64, width=64, num_inference_steps=20, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(i)).images[0] for i, s in enumerate(scenes)]
    wanted = [{k: v for k, v in s.labels().items() if k != "texture"} for s in scenes]
    got = accuracy(evaluator.predict(pixels(images)), wanted)
    assert min(got[k] for k in ("colour", "size", "position", "background", "pattern")) >= 0.9, got
    assert got["shape"] >= 0.3, got


def test_subjects_are_new_to_the_base_model(pipe, evaluator):
    """Asked for the trigger word, the base draws ordinary pictures: never the subject's look."""
    for subject in subjects.SUBJECTS.values():
        images = pipe(f"a {subject.trigger} {subject.noun}", height=64, width=64, num_inference_steps=20,
                      guidance_scale=4.0, num_images_per_prompt=4,
                      generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
        looks = [all(p[k] == v for k, v in subject.look_labels.items()) for p in evaluator.predict(pixels(images))]
        assert not any(looks), subject.name


# ---------------------------------------------------------------------------------------------------------------
# The build script, shrunk
# ---------------------------------------------------------------------------------------------------------------
def test_build_writes_a_loadable_pipeline_and_evaluator(tmp_path):
    from lens_tune import LensPipeline
    from lens_tune.toy.build import BuildSettings, build

    settings = BuildSettings(base_images=64, wide_images=32, held_out=16, vae_steps=2, vae_batch=4,
                             transformer_steps=2, transformer_batch=4, evaluator_steps=2, evaluator_batch=4,
                             check_prompts=1, sample_steps=1)
    record = build(tmp_path, settings, log=lambda *_: None)
    assert set(record["seconds"]) == {"world", "vae", "text", "transformer", "evaluator", "checks", "total"}
    from lens_tune.model.text_encoder import chat_prefix_length

    pipe = LensPipeline.from_pretrained(tmp_path / "lens-toy")
    assert pipe.txt_offset == chat_prefix_length(components.build_tokenizer())
    assert ToyEvaluator.load(tmp_path / "evaluator").labels == {k: tuple(v) for k, v in world.LABELS.items()}
