"""The data phases end to end on the tiny model: caching, reuse, invalidation, exactness and corruption."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from lens_tune.data.buckets import fit_to_bucket
from lens_tune.data.cache import FeatureCache
from lens_tune.data.images import load_image
from lens_tune.data.prepare import prepare_training_data
from lens_tune.errors import DatasetError, ModelLoadError
from lens_tune.recipe.load import load_recipe
from lens_tune.recipe.lock import check_lock, locked, write_lock
from lens_tune.recipe.schema import Recipe

EXAMPLES = Path(__file__).parents[1] / "examples" / "subject"

RECIPE = """
model:
  source: tiny
data:
  trigger: sks
  min_image_size: 64
  datasets:
    - kind: subject
      folder: images
      resolution: [64]
cache:
  dir: cache
validation:
  prompts: ["a photo of [trigger] toy robot on a beach"]
"""


def quiet(_message: str) -> None:
    pass


@pytest.fixture
def workspace(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("robot_01", "robot_02", "robot_03"):
        shutil.copy(EXAMPLES / f"{name}.png", images)
        shutil.copy(EXAMPLES / f"{name}.txt", images)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def recipe_of(workspace, *overrides) -> Recipe:
    return load_recipe(workspace / "recipe.yaml", Recipe, list(overrides))


def prepare(recipe):
    return prepare_training_data(recipe, device=torch.device("cpu"), log=quiet)


def test_second_run_reuses_everything_and_one_changed_caption_is_reencoded(workspace):
    first = prepare(recipe_of(workspace))
    assert first.encoded == {"text": 4, "latents": 3}  # 3 captions + 1 validation prompt; 3 images
    second = prepare(recipe_of(workspace))
    assert second.encoded == {"text": 0, "latents": 0} and second.reused == {"text": 4, "latents": 3}
    (workspace / "images" / "robot_02.txt").write_text("a photo of [trigger] toy robot, close up")
    third = prepare(recipe_of(workspace))
    assert third.encoded == {"text": 1, "latents": 0}
    assert third.fingerprint != first.fingerprint


def test_cached_features_equal_the_pipeline_and_a_fresh_encode(workspace):
    from lens_tune import LensPipeline
    from lens_tune.model.latents import encode_pixels, load_vae, pixels_from_image
    from lens_tune.model.tiny import tiny_pipeline_dir

    recipe = recipe_of(workspace)
    prepared = prepare(recipe)
    cache = FeatureCache(prepared.cache_dir)
    pipe = LensPipeline.from_pretrained(tiny_pipeline_dir())

    example = next(e for e in prepared.examples if e.origin.endswith("robot_01.png"))
    caption = cache.meta(example.caption_keys[0])["caption"]
    assert caption == "a photo of sks toy robot on a wooden table"
    embeds, mask, _, _ = pipe.encode_prompt(caption)
    cached = cache.get(example.caption_keys[0])
    for i, layer in enumerate(embeds):
        assert torch.equal(cached[f"layer.{i}"], layer[0][mask[0]])  # bit for bit, fp32 on CPU

    vae = load_vae(tiny_pipeline_dir() / "vae")
    image = load_image((workspace / "images" / "robot_01.png").read_bytes(), "robot_01.png", min_size=1)
    image = fit_to_bucket(image, example.bucket, crop="center", flip=False, crop_seed=None)
    with torch.no_grad():
        fresh = encode_pixels(vae, pixels_from_image(image))[0]
    assert torch.equal(cache.get(example.latent_keys[0])["tokens"], fresh)
    prompt_key = prepared.prompt_keys["a photo of sks toy robot on a beach"]
    assert cache.meta(prompt_key)["caption"] == "a photo of sks toy robot on a beach"


def test_settings_that_change_an_encoding_change_its_key(workspace):
    base = prepare(recipe_of(workspace))
    flipped = prepare(recipe_of(workspace, "data.datasets.0.flip=true"))
    assert flipped.encoded["latents"] == 3  # the mirrored variants are new; the originals are reused
    assert all(len(e.latent_keys) == 2 for e in flipped.examples)
    resized = prepare(recipe_of(workspace, "data.datasets.0.resolution=[128]"))
    assert resized.encoded == {"text": 0, "latents": 3}
    assert {e.latent_keys[0] for e in base.examples}.isdisjoint({e.latent_keys[0] for e in resized.examples})


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_shards_are_detected_and_rebuilt(workspace, damage):
    first = prepare(recipe_of(workspace))
    cache = FeatureCache(first.cache_dir)
    originals = {k: cache.get(k) for e in first.examples for k in e.latent_keys}
    for shard in first.cache_dir.glob("shard-*.safetensors"):
        data = bytearray(shard.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[-5] ^= 0xFF  # the last tensor's bytes, past the header
        shard.write_bytes(bytes(data))
    again = prepare(recipe_of(workspace))
    assert again.encoded["latents"] + again.encoded["text"] > 0
    rebuilt = FeatureCache(again.cache_dir)
    for key, tensors in originals.items():
        assert torch.equal(rebuilt.get(key)["tokens"], tensors["tokens"])


def test_an_interrupted_shard_is_ignored(workspace):
    first = prepare(recipe_of(workspace))
    for sidecar in first.cache_dir.glob("shard-*.json"):
        sidecar.unlink()  # as if killed between writing the shard and its index
    assert len(FeatureCache(first.cache_dir)) == 0
    assert prepare(recipe_of(workspace)).encoded == {"text": 4, "latents": 3}


def test_text_encoder_is_released_before_the_latent_phase(workspace, monkeypatch):
    import lens_tune.model.latents as latents
    from lens_tune.model.text_encoder import LensGptOssEncoder

    def encoders_alive() -> int:
        gc.collect()
        return sum(isinstance(o, LensGptOssEncoder) for o in gc.get_objects())

    before = encoders_alive()  # other tests' objects may still be around; prepare must add none
    alive_during_vae = []
    real_load_vae = latents.load_vae

    def spy(*args, **kwargs):
        alive_during_vae.append(encoders_alive())
        return real_load_vae(*args, **kwargs)

    monkeypatch.setattr(latents, "load_vae", spy)
    prepare(recipe_of(workspace))
    assert alive_during_vae == [before]


def test_bad_images_are_listed_together_or_skipped(workspace):
    (workspace / "images" / "broken.png").write_bytes((workspace / "images" / "robot_01.png").read_bytes()[:300])
    (workspace / "images" / "notes.png").write_text("not an image")
    with pytest.raises(DatasetError) as error:
        prepare(recipe_of(workspace))
    message = str(error.value)
    assert "2 of 5 images cannot be used" in message and "broken.png" in message and "notes.png" in message
    skipped = prepare(recipe_of(workspace, "data.on_bad_image=skip"))
    assert len(skipped.examples) == 3


def test_missing_model_stops_before_any_work(workspace):
    recipe = recipe_of(workspace, "model.source=./no-such-model")
    with pytest.raises(ModelLoadError, match="'./no-such-model' does not exist.*hf download"):
        prepare(recipe)
    assert not (workspace / "cache").exists()


def test_class_images_are_generated_once_and_reused(workspace):
    overrides = [
        "dreambooth.class_prompt=a photo of a toy robot",
        "dreambooth.prior_preservation=true",
        "dreambooth.num_class_images=3",
        "dreambooth.class_image_steps=2",
    ]
    first = prepare(recipe_of(workspace, *overrides))
    classes = [e for e in first.examples if e.kind == "class"]
    assert len(classes) == 3 and all(e.loss_weight == 1.0 and e.bucket.width == 64 for e in classes)
    generated = sorted((workspace / "cache" / "class_images").glob("*.png"))
    assert len(generated) == 3
    stamps = [p.stat().st_mtime_ns for p in generated]
    prepare(recipe_of(workspace, *overrides))
    assert [p.stat().st_mtime_ns for p in generated] == stamps  # reused, not regenerated
    more = prepare(recipe_of(workspace, *overrides[:-1], "dreambooth.class_image_steps=3"))
    assert len(list((workspace / "cache" / "class_images").glob("*.png"))) == 6  # new settings, new images
    assert sum(e.kind == "class" for e in more.examples) == 3


def test_class_images_are_what_the_pipeline_draws_from_the_prompt(workspace):
    """The class prompt is encoded once outside the pipeline; the pictures are those the whole pipeline draws."""
    import numpy as np
    from PIL import Image

    from lens_tune.model.pipeline import LensPipeline
    from lens_tune.model.sources import locate_model

    recipe = recipe_of(workspace, "dreambooth.class_prompt=a photo of a toy robot", "dreambooth.prior_preservation=true",
                       "dreambooth.num_class_images=2", "dreambooth.class_image_steps=2", "dreambooth.class_image_seed=7")
    prepare(recipe)
    pipe = LensPipeline.from_pretrained(locate_model("tiny", None), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = recipe.data.datasets[0].resolution[0]
    expected = [np.asarray(pipe("a photo of a toy robot", height=size, width=size, num_inference_steps=2,
                                guidance_scale=5.0, generator=torch.Generator().manual_seed(7 + i)).images[0])
                for i in range(2)]
    made = [np.asarray(Image.open(p)) for p in (workspace / "cache" / "class_images").glob("*.png")]
    assert len(made) == 2 and all(any(np.array_equal(m, e) for m in made) for e in expected)


def test_class_images_are_drawn_by_the_run_s_own_reduced_base(workspace, monkeypatch):
    """A quantised base, or one with its modulation in host memory, draws the class images itself (loaded as the
    trainer loads it, lens_tune.train.base.load_base): with the modulation on the host the same pictures as the
    plain base; quantised, other pictures under other cache keys."""
    import numpy as np
    from PIL import Image

    import lens_tune.train.base as base

    loaded = []
    monkeypatch.setattr(base, "load_base", lambda *a, real=base.load_base: loaded.append(a[0].model) or real(*a))
    common = ["dreambooth.class_prompt=a photo of a toy robot", "dreambooth.prior_preservation=true",
              "dreambooth.num_class_images=1", "dreambooth.class_image_steps=2", f"cache.dir={workspace / 'cache'}"]

    def pictures(name: str, *overrides: str) -> dict[str, np.ndarray]:
        """Class images drawn into a fresh class_images/ (the features are shared), then moved to `name`/."""
        prepare(recipe_of(workspace, *common, *overrides))
        folder = (workspace / "cache" / "class_images").rename(workspace / name)
        return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in folder.glob("*.png")}

    plain = pictures("plain")
    hosted = pictures("hosted", "model.modulation_device=cpu")
    assert len(plain) == 1 and hosted.keys() == plain.keys() and all(np.abs(hosted[k] - plain[k]).max() <= 2 for k in plain)
    quantised = pictures("quantised", "model.quantization=int8")
    assert len(quantised) == 1 and not quantised.keys() & plain.keys()
    assert [(m.quantization, m.modulation_device) for m in loaded] == [("none", "gpu"), ("none", "cpu"), ("int8", "gpu")]


def test_lock_file_round_trip_and_data_check(workspace):
    recipe = recipe_of(workspace)
    prepared = prepare(recipe)
    lock_path = workspace / "recipe.lock.yaml"
    write_lock(locked(recipe, prepared.fingerprint, None), lock_path)
    reloaded = load_recipe(lock_path, Recipe)
    assert reloaded.model_dump(exclude={"lock"}) == recipe.model_dump(exclude={"lock"})
    assert reloaded.lock.dataset_fingerprint == prepared.fingerprint and reloaded.lock.packages["torch"]
    assert check_lock(reloaded, prepared.fingerprint) == []
    from lens_tune.errors import RecipeError

    with pytest.raises(RecipeError, match="training data changed"):
        check_lock(reloaded, "0" * 64)


def test_quickstart_recipe_caches_then_reuses_everything(tmp_path, capsys, monkeypatch):
    from lens_tune.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    argv = ["cache", "recipes/quickstart.yaml", f"cache.dir={tmp_path}"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    # 6 captions + 2 validation prompts; 6 pictures (no prior preservation: no class images)
    assert "text features 8 encoded / 0 reused, latents 6 encoded / 0 reused" in first
    assert "aspect" in first and "total" in first  # the bucket histogram
    assert main(argv) == 0
    assert "text features 0 encoded / 8 reused, latents 0 encoded / 6 reused" in capsys.readouterr().out


def test_text_encoder_placement_settings():
    """model.text_encoder_device / text_encoder_quantization decide where GPT-OSS runs and whether MXFP4 stays."""
    from lens_tune.data.text_encoding import text_encoder_keeps_mxfp4, text_encoder_placement
    from lens_tune.errors import LensTuneError
    from lens_tune.recipe.schema import ModelSettings

    class R:  # only the model section is read
        def __init__(self, **model):
            self.model = ModelSettings(source="tiny", **model)

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert text_encoder_placement(R(), gpu) == (gpu, None)
    assert text_encoder_placement(R(text_encoder_device="cpu"), gpu) == (cpu, None)
    assert text_encoder_placement(R(text_encoder_device="offload"), gpu) == (cpu, gpu)  # host weights, GPU layers
    assert text_encoder_placement(R(text_encoder_device="offload"), cpu) == (cpu, None)  # no GPU: runs on the CPU
    assert text_encoder_placement(R(), cpu) == (cpu, None)
    with pytest.raises(LensTuneError, match="text_encoder_device is gpu but this run has no GPU"):
        text_encoder_placement(R(text_encoder_device="gpu"), cpu)
    assert text_encoder_keeps_mxfp4(R()) and not text_encoder_keeps_mxfp4(R(text_encoder_quantization="none"))
    with pytest.raises(LensTuneError, match="nf4 is not available"):
        text_encoder_keeps_mxfp4(R(text_encoder_quantization="nf4"))
