"""Base model against adapter, from the same seeds: one pipeline held between requests, adapters swapped on demand.

Loading a Lens pipeline is the slow part, so it stays loaded while the base model stays the same; choosing a run
with another base model, starting a training from the page, or memory running short releases it. The adapter is
loaded once per selection and the base image is the same pipeline with the adapter's scale at 0.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

from lens_tune.errors import LensTuneError

ADAPTER = "preview"
MAX_SIDE = 2048
MAX_STEPS = 200
MAX_SEEDS = 8
MAX_GUIDANCE = 30.0
MAX_SCALE = 4.0
LOW_MEMORY = 0.10  # release the model when less than this fraction of RAM (or GPU memory) is free
HEADROOM = 1.25  # loading needs about the weights' size on disk, plus this margin


class PreviewError(LensTuneError):
    """A preview request that cannot be served: values out of range, a model that is not here, too little memory."""


@dataclass(frozen=True)
class PreviewRequest:
    prompt: str
    negative: str = ""
    seed: int = 0
    seeds: int = 1  # images per model: seed, seed+1, ...
    steps: int = 20
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    scale: float = 1.0

    def check(self) -> None:
        """PreviewError naming every value out of range."""
        problems = []
        if not self.prompt.strip():
            problems.append("type a prompt")
        for name, value in (("width", self.width), ("height", self.height)):
            if value != int(value) or not 16 <= value <= MAX_SIDE or int(value) % 16:
                problems.append(f"{name} {value:g} must be a multiple of 16 between 16 and {MAX_SIDE} "
                                "(Lens works on 16-pixel tokens)")
        if self.steps != int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            problems.append(f"steps {self.steps:g} must be between 1 and {MAX_STEPS}")
        if self.seeds != int(self.seeds) or not 1 <= self.seeds <= MAX_SEEDS:
            problems.append(f"number of seeds {self.seeds:g} must be between 1 and {MAX_SEEDS}")
        if self.seed != int(self.seed) or not 0 <= self.seed < 2**63 - MAX_SEEDS:
            problems.append(f"seed {self.seed} must be a whole number from 0")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            problems.append(f"guidance {self.guidance:g} must be between 0 and {MAX_GUIDANCE:g}")
        if not -MAX_SCALE <= self.scale <= MAX_SCALE:
            problems.append(f"adapter scale {self.scale:g} must be between -{MAX_SCALE:g} and {MAX_SCALE:g}")
        if problems:
            raise PreviewError("; ".join(problems) + ".")


@dataclass(frozen=True)
class BaseModel:
    """What a run was trained on, from its recipe.lock.yaml `model` section."""

    source: str
    revision: str | None = None
    transformer_file: str | None = None

    @classmethod
    def of_recipe(cls, recipe: dict) -> "BaseModel":
        model = recipe.get("model") or {}
        if not model.get("source"):
            raise PreviewError("this run has no recipe.lock.yaml yet, so its base model is unknown; wait until it "
                               "trains")
        return cls(str(model["source"]), model.get("revision"), model.get("transformer_file"))


def device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def free_memory(device) -> tuple[int, int]:
    """(free, total) bytes of RAM, or of the GPU's memory for a CUDA device."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, memory.total


def weights_size(root: Path, transformer_file: str | None) -> int:
    files = [p for p in root.rglob("*.safetensors") if not (transformer_file and p.parent.name == "transformer")]
    return sum(p.stat().st_size for p in files) + (Path(transformer_file).stat().st_size if transformer_file else 0)


class PreviewModel:
    """The one pipeline the dashboard holds. Requests are served one at a time (a lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.pipe = None
        self.base: BaseModel | None = None
        self.adapter: Path | None = None

    def select(self, base: BaseModel | None) -> None:
        """The page now shows a run on `base`: release the pipeline if it holds another model."""
        with self._lock:
            if self.pipe is not None and base != self.base:
                self._release()

    def release(self) -> None:
        with self._lock:
            self._release()

    def release_if_memory_short(self) -> bool:
        """Release the pipeline when less than LOW_MEMORY of memory is free (something else needs it)."""
        if self.pipe is None or not self._lock.acquire(blocking=False):
            return False  # nothing held, or a request is using it right now
        try:
            free, total = free_memory(self.pipe.transformer.device)
            if free >= LOW_MEMORY * total:
                return False
            self._release()
            return True
        finally:
            self._lock.release()

    def _release(self) -> None:
        self.pipe, self.base, self.adapter = None, None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, base: BaseModel) -> None:
        from lens_tune.model.sources import locate_model

        root = locate_model(base.source, base.revision, download=False)
        if root is None:
            raise PreviewError(f"the base model {base.source} is not on this machine, and the dashboard does not "
                               f"download models: fetch it first (hf download {base.source})")
        device, dtype = device_and_dtype()
        needed = weights_size(root, base.transformer_file) * HEADROOM
        free, _ = free_memory(device)
        if needed > free:
            self._release()
            free, _ = free_memory(device)
            if needed > free:
                raise PreviewError(f"not enough memory to load {base.source}: it needs about {needed / 2**30:.1f} GiB, "
                                   f"{free / 2**30:.1f} GiB are free on {device.type}")
        from lens_tune import LensPipeline, LensTransformer2DModel

        components = {}
        if base.transformer_file:
            components["transformer"] = LensTransformer2DModel.from_single_file(
                base.transformer_file, config=root / "transformer", torch_dtype=dtype).to(device)
        pipe = LensPipeline.from_pretrained(root, torch_dtype=dtype, revision=base.revision, device=device,
                                            **components)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.base, self.adapter = pipe, base, None

    def render(self, base: BaseModel, adapter: Path, request: PreviewRequest) -> list[tuple]:
        """[(image, caption)]: for each seed the base image, then the adapter's, from the same noise."""
        import torch

        request.check()
        with self._lock:
            if self.pipe is None or self.base != base:
                self._release()
                self._load(base)
            if self.adapter != adapter:
                self.pipe.unload_lora_weights()
                self.adapter = None
                try:
                    self.pipe.load_lora_weights(adapter, adapter_name=ADAPTER, scale=request.scale)
                except Exception:
                    self._release()  # a half-loaded adapter would stay in the transformer: start clean next time
                    raise
                self.adapter = adapter
            seeds = [int(request.seed) + i for i in range(int(request.seeds))]
            outputs = {}
            for label, scale in (("base", 0.0), (f"adapter x{request.scale:g}", request.scale)):
                self.pipe.set_adapters([ADAPTER], [float(scale)])
                outputs[label] = self.pipe(
                    request.prompt, negative_prompt=request.negative, height=int(request.height),
                    width=int(request.width), num_inference_steps=int(request.steps),
                    guidance_scale=float(request.guidance), num_images_per_prompt=len(seeds),
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],  # CPU noise: same on any device
                ).images
        return [(outputs[label][i], f"seed {seed} · {label}") for i, seed in enumerate(seeds) for label in outputs]
