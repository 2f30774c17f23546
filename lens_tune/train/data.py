"""Training batches, read from the caches.

Training consumes one global stream of micro-batches. Micro-batch g and every random choice made for it (image and
caption variant, caption dropout, noise, sigma, adapter dropout) are a pure function of (seed, g). That is what makes
an interrupted run resume exactly and N processes with accumulation A equal one process with accumulation N*A: the
stream does not depend on how it is cut up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lens_tune.data.buckets import BucketBatchSampler
from lens_tune.data.cache import FeatureCache
from lens_tune.data.prepare import TrainingExample


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
    text_mask: torch.Tensor  # [B, L] bool
    weights: torch.Tensor  # [B] loss weights (prior_loss_weight for class images)
    grid: tuple[int, int]


def load_batch(
    examples: list[TrainingExample], cache: FeatureCache, generator: torch.Generator, device: torch.device,
    dtype: torch.dtype, text_shape: tuple[int, int],
) -> Batch:
    """Pick each example's image and caption variant and its caption dropout with `generator`; pad the text.

    A dropped caption is Lens's unconditional input: no valid text token (zero features, mask all False), the same
    thing the sampler's classifier-free guidance feeds for an empty negative prompt. `text_shape` is (number of text
    layers, feature width) of the transformer.
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
    return Batch(
        latents=torch.stack(latents).to(device, dtype),
        text=[t.to(device, dtype) for t in text],
        text_mask=mask.to(device),
        weights=torch.tensor([e.loss_weight for e in examples], device=device),
        grid=(bucket.height // 16, bucket.width // 16),
    )

