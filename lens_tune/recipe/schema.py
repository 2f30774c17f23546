"""The recipe schema: every setting of a run, its type, its default and a one-line description.

Defaults suit a single 16 GB GPU. `lens-tune validate --explain` prints this file's descriptions; the YAML recipes in
`recipes/` are commented copies of the parts a user usually changes. Relative file paths are resolved against the
recipe file that sets them; `model.source` (a folder or a Hub repo id) is read like a command-line argument, from the
working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

TRIGGER_PLACEHOLDER = "[trigger]"
MAX_SIDE = 8192  # pixels; far beyond what Lens was trained at, and stops a typo from allocating terabytes
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; class image i uses seed + i


def _multiple_of_16(value: int, what: str = "a size") -> int:
    if value <= 0 or value % 16:
        raise ValueError(f"{what} must be a positive multiple of 16 (Lens works on 16-pixel tokens), got {value}")
    if value > MAX_SIDE:
        raise ValueError(f"{what} must be at most {MAX_SIDE} pixels, got {value}")
    return value


Resolution = Annotated[int, AfterValidator(lambda v: _multiple_of_16(v, "a resolution"))]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def rule_error(message: str, *at: str | int) -> PydanticCustomError:
    """A cross-field rule broken; `at` is the path, relative to the model raising it, of the field to point at."""
    return PydanticCustomError("value_error", message.replace("{", "{{").replace("}", "}}"), {"at": at})


class Section(BaseModel):
    # no NaN or infinity anywhere: no setting means "infinite", and NaN would only surface as a NaN loss
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(Section):
    source: str = Field(
        description="the base model: 'tiny' (built-in tiny random model), a local Lens pipeline folder, or a Hub repo "
        "id such as SceneWorks/Lens"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of `source`")
    transformer_file: Path | None = Field(
        None, description="a single-file transformer checkpoint (.safetensors, e.g. Comfy-Org lens_bf16) used instead of source's"
    )
    variant: Literal["lens", "lens-turbo", "lens-base"] = Field(
        "lens", description="which Lens weights `source` holds (sets sampling defaults: turbo 4 steps CFG 1, others 20 steps CFG 5)"
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="weights dtype: auto = bf16 on a GPU, fp32 on a CPU")
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="weight-only quantisation of the frozen transformer (bitsandbytes): int8 ~4.1 GB, nf4 ~2.3 GB"
    )
    modulation_device: Literal["gpu", "cpu"] = Field(
        "gpu", description="where the blocks' adaLN modulation layers live while training: cpu keeps their 1.36B "
        "frozen parameters (2.7 GB bf16) in host memory and computes them there once per step, off the GPU"
    )
    text_encoder_device: Literal["auto", "gpu", "offload", "cpu"] = Field(
        "auto", description="where GPT-OSS runs while text features and the class prompt are encoded: auto/gpu = all "
        "of it on the GPU; offload = weights in host memory, one decoder layer at a time on the GPU (about 3 GB; "
        "for 8-16 GB cards); cpu = on the CPU"
    )
    text_encoder_quantization: Literal["auto", "none", "nf4"] = Field(
        "auto", description="GPT-OSS on the GPU: auto keeps MXFP4 on Hopper GPUs (13.8 GB) and dequantises elsewhere; "
        "none always dequantises; nf4 is not available (bitsandbytes cannot quantise its fused experts)"
    )


class Dataset(Section):
    kind: Literal["subject", "style"] = Field(description="subject (DreamBooth: one object or person) or style (a look)")
    folder: Path | None = Field(None, description="a folder of images with optional same-stem .txt captions")
    metadata: Path | None = Field(None, description="a metadata.jsonl file (file_name, text) or a folder holding one")
    hub: str | None = Field(None, description="a `datasets` dataset: local path or Hub id")
    hub_revision: str | None = Field(None, description="Hub revision of `hub`")
    split: str = Field("train", description="split of `hub`")
    image_column: str = Field("image", description="image column of `hub`")
    caption_column: str | None = Field("text", description="caption column of `hub` (null: no captions)")
    use_captions: bool = Field(True, description="use the dataset's captions; false uses dreambooth.instance_prompt for every image")
    caption_dropout: float = Field(0.05, ge=0.0, le=1.0, description="probability of training a step on the empty caption")
    shuffle_tags: bool = Field(False, description="shuffle comma-separated tags of each caption (the first keep_tags stay)")
    keep_tags: int = Field(1, ge=0, description="leading tags that shuffle_tags leaves in place")
    shuffle_variants: int = Field(4, ge=1, le=64, description="shuffled versions cached per caption when shuffle_tags is on")
    repeats: int = Field(1, ge=1, le=10000, description="how many times each image counts per epoch")
    resolution: list[Resolution] = Field([1024], min_length=1, description="training resolution(s); each a multiple of 16 (buckets keep ~res² pixels)")
    bucketing: bool = Field(True, description="aspect-ratio buckets (1:2 to 2:1); false crops every image square")
    max_upscale: float = Field(1.0, ge=1.0, le=4.0, description="largest allowed upscaling of an image to fill its bucket")
    crop: Literal["center", "random"] = Field("center", description="how an image is cropped to its bucket")
    crop_variants: int = Field(1, ge=1, le=16, description="random crops cached per image when crop is random")
    flip: bool = Field(False, description="also train on mirrored images (do not use for text or asymmetric subjects)")

    @model_validator(mode="after")
    def _one_source(self) -> "Dataset":
        given = [name for name in ("folder", "metadata", "hub") if getattr(self, name) is not None]
        if not given:
            raise rule_error("a dataset needs one of folder, metadata or hub")
        if len(given) > 1:
            raise rule_error(f"a dataset takes exactly one of folder, metadata or hub (it has {', '.join(given)})", given[1])
        return self


class DataSettings(Section):
    datasets: list[Dataset] = Field(min_length=1, description="one or more datasets, mixed in training")
    trigger: str | None = Field(None, description="the trigger word, substituted for [trigger] in captions and prompts")
    trigger_mode: Literal["replace", "prepend"] = Field(
        "replace", description="replace: only [trigger] placeholders; prepend: also put it first in captions that lack it"
    )
    on_bad_image: Literal["error", "skip"] = Field("error", description="error: stop listing every bad image; skip: leave them out")
    min_image_size: int = Field(256, ge=16, description="images whose shorter side is smaller are rejected")
    background: str = Field("white", description="colour transparent images are composited on (name or #rrggbb)")

    @field_validator("background")
    @classmethod
    def _colour(cls, value: str) -> str:
        from PIL import ImageColor

        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"'{value}' is not a colour; use a name such as white or a hex value such as #808080") from None
        return value


class DreamBoothSettings(Section):
    instance_prompt: str | None = Field(None, description="the subject's prompt, e.g. 'a photo of [trigger] dog'")
    class_prompt: str | None = Field(None, description="the prompt of the subject's class, e.g. 'a photo of a dog'")
    prior_preservation: bool = Field(False, description="train on class images too, so the class keeps its look")
    num_class_images: int = Field(100, ge=1, le=10000, description="class images wanted; missing ones are generated")
    class_images_folder: Path | None = Field(None, description="existing class images to use before generating any")
    class_image_model: str | None = Field(
        None, description="model source that generates class images (null: the base model; a Lens-Turbo source is fastest)"
    )
    class_image_steps: int | None = Field(None, ge=1, le=200, description="sampling steps for class images (null: 4 for turbo, else 20)")
    class_image_guidance: float | None = Field(None, ge=0.0, description="guidance for class images (null: 1 for turbo, else 5)")
    class_image_resolution: int | None = Field(None, description="class image size (null: the first dataset's first resolution)")
    class_image_seed: Seed = Field(0, description="first seed; image i uses seed + i")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="weight of the class images' loss")

    @field_validator("class_image_resolution")
    @classmethod
    def _resolution(cls, value: int | None) -> int | None:
        return None if value is None else _multiple_of_16(value, "class_image_resolution")

    @model_validator(mode="after")
    def _prior_needs_class_prompt(self) -> "DreamBoothSettings":
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise rule_error("prior_preservation needs a class_prompt (e.g. 'a photo of a dog')", "prior_preservation")
        return self


class LoraSettings(Section):
    type: Literal["lora", "dora", "lokr", "loha"] = Field("lora", description="adapter kind (PEFT)")
    rank: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="scale numerator (null: equal to rank, i.e. scale 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(rank)")
    init: Literal["default", "gaussian", "pissa"] = Field("default", description="initialisation of LoRA weights")
    targets: Literal["attention", "attention-mlp", "all"] | list[str] = Field(
        "attention-mlp", description="attention | attention-mlp | all (adds img_mod/txt_mod) | a list of module names"
    )
    blocks: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="indices of transformer blocks to adapt (null: all 48)")
    init_from: Path | None = Field(None, description="an adapter to continue training: a lens-tune adapter folder, or a diffusers, ComfyUI or kohya LoRA file")

    @property
    def adapts_modulation(self) -> bool:
        """Whether the targets include the blocks' img_mod/txt_mod layers."""
        targets = [self.targets] if isinstance(self.targets, str) else self.targets
        return any(t == "all" or "_mod" in t for t in targets)


class TrainSettings(Section):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, le=256, description="images per step and process (one bucket per batch)")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="peak learning rate")
    optimizer: Literal["adamw8bit", "adamw", "lion8bit", "adafactor", "prodigy"] = Field("adamw8bit", description="optimizer")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="learning-rate schedule after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (null: none)")
    gradient_checkpointing: bool = Field(True, description="recompute block activations in the backward pass (less memory)")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="autocast: auto = bf16 on GPU, none on CPU")
    timestep_sampling: Literal["logit-normal", "uniform", "shifted"] = Field(
        "logit-normal", description="how sigma is drawn per sample"
    )
    logit_mean: float = Field(0.0, description="mean of the logit-normal sigma distribution")
    logit_std: float = Field(1.0, gt=0, description="std of the logit-normal sigma distribution")
    shift: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description="sigma shift: auto grows with image tokens; 1 = none")
    ema: bool = Field(False, description="keep an exponential moving average of the adapter weights")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per step")
    max_nonfinite_steps: int = Field(20, ge=1, description="consecutive NaN/inf losses that stop the run")
    seed: Seed = Field(0, description="seed for data order, noise and sigma sampling")
    tensorboard: bool = Field(False, description="also log loss, lr and grad norm to TensorBoard in RUN/tensorboard (pip install tensorboard)")
    compile_blocks: bool = Field(
        False, description="torch.compile every transformer block (faster steps on a GPU; the first steps, the first "
        "validation samples and each new bucket size wait for a compile; needs a C++ compiler, and Triton on a GPU)")


class ValidationSettings(Section):
    prompts: list[str] = Field([], description="prompts rendered before training, every `every` steps and at the end")
    negative_prompt: str = Field("", description="negative prompt for validation samples")
    seeds: list[Seed] = Field([0], min_length=1, description="one sample per prompt and seed")
    every: int = Field(250, ge=1, description="steps between validation samples")
    before_training: bool = Field(True, description="render a baseline before the first step")
    steps: int | None = Field(None, ge=1, le=200, description="sampling steps (null: the variant's default)")
    guidance: float | None = Field(None, ge=0.0, description="guidance scale (null: the variant's default)")
    width: int | None = Field(None, description="sample width (null: the first dataset's first resolution)")
    height: int | None = Field(None, description="sample height (null: the first dataset's first resolution)")

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None, info) -> int | None:
        return None if value is None else _multiple_of_16(value, info.field_name)


class CheckpointSettings(Section):
    every: int = Field(250, ge=1, description="steps between checkpoints")
    keep_last: int = Field(3, ge=1, description="checkpoints kept besides the final one")


class ExportSettings(Section):
    formats: list[Literal["diffusers", "comfyui"]] = Field(["diffusers", "comfyui"], description="adapter files to write")
    hub_repo: str | None = Field(None, description="USER/REPO to push to (token from HF_TOKEN or the saved login)")
    private: bool = Field(True, description="create the Hub repo private")


class CacheSettings(Section):
    dir: Path | None = Field(None, description="cache folder shared by runs: features/ and class_images/ (null: ~/.cache/lens-tune)")
    shard_mib: int = Field(64, ge=1, le=4096, description="size of each cache file; also the most the writer holds in memory")


class OutputSettings(Section):
    dir: Path = Field(Path("runs"), description="runs are written to DIR/NAME/TIMESTAMP/")
    name: str | None = Field(None, description="run name (null: the recipe file's name)")


class LockInfo(Section):
    """What recipe.lock.yaml records besides the settings, so a run can be reproduced and checked."""

    lens_tune: str = Field(description="lens-tune version that wrote the lock")
    packages: dict[str, str] = Field(description="versions of the main dependencies")
    model: dict[str, str | None] = Field(description="model source, revision and the resolved folder's fingerprint")
    dataset_fingerprint: str = Field(description="hash of every training image and caption")
    created: str = Field(description="when the lock was written (UTC, ISO 8601)")


class Recipe(Section):
    """A whole run. Sections other than model and data have defaults for everything."""

    model: ModelSettings
    data: DataSettings
    dreambooth: DreamBoothSettings = Field(default_factory=DreamBoothSettings, description="DreamBooth settings")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="the adapter")
    train: TrainSettings = Field(default_factory=TrainSettings, description="the optimisation")
    validation: ValidationSettings = Field(default_factory=ValidationSettings, description="validation samples")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings, description="checkpoints")
    export: ExportSettings = Field(default_factory=ExportSettings, description="adapter export")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="feature caches")
    output: OutputSettings = Field(default_factory=OutputSettings, description="where runs go")
    lock: LockInfo | None = Field(None, description="written by lens-tune into recipe.lock.yaml; checked when running from a lock")

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        texts = [(("dreambooth", "instance_prompt"), self.dreambooth.instance_prompt)]
        texts += [(("validation", "prompts", i), p) for i, p in enumerate(self.validation.prompts)]
        for at, text in texts:
            if text and TRIGGER_PLACEHOLDER in text and not self.data.trigger:
                raise rule_error(f"'{text}' uses [trigger] but data.trigger is not set", *at)
        if self.dreambooth.class_prompt and TRIGGER_PLACEHOLDER in self.dreambooth.class_prompt:
            raise rule_error(
                "dreambooth.class_prompt must not contain [trigger]: it describes the class, not the subject",
                "dreambooth", "class_prompt",
            )
        for i, dataset in enumerate(self.data.datasets):
            if dataset.kind == "subject" and not dataset.use_captions and not self.dreambooth.instance_prompt:
                raise rule_error(
                    "a subject dataset with use_captions: false needs dreambooth.instance_prompt",
                    "data", "datasets", i, "use_captions",
                )
        if self.model.modulation_device == "cpu" and self.lora.adapts_modulation:
            raise rule_error(
                "model.modulation_device: cpu keeps img_mod/txt_mod frozen off the GPU, so lora.targets cannot adapt "
                "them: use attention or attention-mlp, or model.modulation_device: gpu", "lora", "targets",
            )
        if self.dreambooth.prior_preservation and not any(d.kind == "subject" for d in self.data.datasets):
            raise rule_error(
                "dreambooth.prior_preservation is for subject datasets, and this recipe has none",
                "dreambooth", "prior_preservation",
            )
        return self
