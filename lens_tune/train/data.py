"""Training batches, read from the caches.

Training consumes one global stream of micro-batches. Micro-batch g and every random choice made for it (image and
caption variant, caption dropout, noise, sigma, adapter dropout) are a pure function of (seed, g). That is what makes
an interrupted run resume exactly and N processes with accumulation A equal one process with accumulation N*A: the
stream does not depend on how it is cut up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from lens_tune.data.buckets import BucketBatchSampler
from lens_tune.data.cache import FeatureCache
from lens_tune.data.prepare import TrainingExample
from lens_tune.recipe.schema import TrainSettings
from lens_tune.train.objective import sample_sigmas


def micro_batch_seed(seed: int, index: int) -> int:
    """A 63-bit seed for micro-batch `index`, independent of its neighbours'."""
    digest = hashlib.sha256(f"lens-tune:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MicroBatchStream:
    """Micro-batch g of the run: every example repeated `repeats` times, batched within buckets, shuffled per epoch."""

    def __init__(self, examples: list[TrainingExample], batch_size: int, seed: int):
        self.items = [example for example in examples for _ in range(example.repeats)]
        self.sampler = BucketBatchSampler([e.bucket for e in self.items], batch_size, seed)
        self._epoch, self._batches = -1, []

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return len(self.sampler)

    def __getitem__(self, index: int) -> list[TrainingExample]:
        epoch, position = divmod(index, len(self))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.batches_of_epoch(epoch)
        return [self.items[i] for i in self._batches[position]]


@dataclass
class Batch:
    latents: torch.Tensor  # [B, h*w, C]
    text: list[torch.Tensor]  # per selected text layer, [B, L, H], zero-padded
    text_mask: torch.Tensor | None  # [B, L] bool; None when no text token is padded (the model then needs no mask)
    weights: torch.Tensor  # [B] loss weights (prior_loss_weight for class images)
    grid: tuple[int, int]
    sigma: torch.Tensor  # [B] noise levels
    noise: torch.Tensor  # like latents
    modulation: torch.Tensor | None = None  # with model.modulation_device: cpu, the blocks' vectors for sigma


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a copy from pageable memory synchronises with the
    GPU, one from pinned memory with non_blocking does not (the cast is done on the host, before pinning)."""
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def load_batch(
    examples: list[TrainingExample], cache: FeatureCache, generator: torch.Generator, device: torch.device,
    dtype: torch.dtype, text_shape: tuple[int, int], settings: TrainSettings, host_modulation=None,
) -> Batch:
    """Pick each example's image and caption variant and its caption dropout with `generator`, pad the text, then
    draw sigma (per `settings`) and the noise from it, in that order.

    A dropped caption is Lens's unconditional input: no valid text token (zero features, mask all False), the same
    thing the sampler's classifier-free guidance feeds for an empty negative prompt. `text_shape` is (number of text
    layers, feature width) of the transformer. With a `HostModulation` (model.modulation_device: cpu) the blocks'
    modulation vectors for sigma are computed here, on the host, while the GPU is still busy with the last step.
    """
    latents, captions = [], []
    for example in examples:
        pick = torch.randint(len(example.latent_keys), (1,), generator=generator).item()
        latents.append(cache.get(example.latent_keys[pick], verify=False)["tokens"])
        caption_pick = torch.randint(len(example.caption_keys), (1,), generator=generator).item()
        dropped = torch.rand(1, generator=generator).item() < example.caption_dropout
        captions.append(None if dropped else cache.get(example.caption_keys[caption_pick], verify=False))
    layers, hidden = text_shape
    length = max((c["layer.0"].shape[0] for c in captions if c is not None), default=0)
    text = torch.zeros(layers, len(examples), length, hidden)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, caption in enumerate(captions):
        if caption is not None:
            n = caption["layer.0"].shape[0]
            for layer in range(layers):
                text[layer, row, :n] = caption[f"layer.{layer}"]
            mask[row, :n] = True
    bucket = examples[0].bucket
    grid = (bucket.height // 16, bucket.width // 16)
    latents = torch.stack(latents)
    sigma = sample_sigmas(settings, len(examples), grid[0] * grid[1], generator)
    noise = torch.randn(latents.shape, generator=generator)
    return Batch(
        latents=to_device(latents, device, dtype),
        text=[to_device(t, device, dtype) for t in text],
        text_mask=None if mask.all() else to_device(mask, device),
        weights=to_device(torch.tensor([e.loss_weight for e in examples]), device),
        grid=grid,
        sigma=to_device(sigma, device),
        noise=to_device(noise, device, dtype),
        modulation=None if host_modulation is None else to_device(host_modulation.compute(sigma, dtype), device, dtype),
    )


class Prefetcher:
    """Micro-batches by index, the next one loaded ahead of use: while the GPU works on the current micro-batch,
    the host reads and pads the next one and starts its copy to the device (see to_device).

    `load(index)` must be a pure function of the index (as the micro-batch stream is), so a batch loaded ahead is
    the one that would have been loaded on time.
    """

    def __init__(self, load: Callable[[int], Batch]):
        self.load = load
        self.ahead: tuple[int, Batch] | None = None

    def get(self, index: int) -> Batch:
        ahead, self.ahead = self.ahead, None
        return ahead[1] if ahead is not None and ahead[0] == index else self.load(index)

    def prefetch(self, index: int) -> None:
        self.ahead = (index, self.load(index))
