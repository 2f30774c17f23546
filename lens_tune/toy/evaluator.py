"""The judge of the toy world: a small CNN that reads a 64x64 picture's labels and embeds it.

Trained on the wide world's labels (shape, colour, size, position, background, pattern, texture), half on clean
pictures and half on the toy VAE's reconstructions of them, so that it reads generated images as well as drawn
ones. It scores generated images the way the DreamBooth paper does with CLIP and DINO:

- label accuracy: does the picture show what the prompt asked for (prompt fidelity, class prompts);
- `embed`: an L2-normalised vector whose cosine similarity compares two pictures (subject fidelity, DINO's role).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lens_tune.toy import world

EMBED_DIM = 128


class ToyEvaluator(nn.Module):
    """A full-resolution convolution (textures are a few pixels wide), four strided ones to a 4x4 map (kept flat, so
    position survives), an embedding, a head per label."""

    def __init__(self, labels: dict[str, tuple[str, ...]] | None = None, width: int = 16):
        super().__init__()
        self.labels = {name: tuple(classes) for name, classes in (labels or world.LABELS).items()}

        def block(cin: int, cout: int, stride: int = 2) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU())

        self.features = nn.Sequential(block(3, width, stride=1), block(width, 2 * width), block(2 * width, 4 * width),
                                      block(4 * width, 4 * width), block(4 * width, 4 * width), nn.Flatten())
        self.embedding = nn.Linear(4 * width * 16, EMBED_DIM)
        self.heads = nn.ModuleDict({name: nn.Linear(EMBED_DIM, len(c)) for name, c in self.labels.items()})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixels [B, 3, 64, 64] in [-1, 1] -> (embedding [B, EMBED_DIM] before normalisation, logits per label)."""
        z = self.embedding(self.features(pixels))
        return z, {name: head(torch.nn.functional.silu(z)) for name, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self(pixels)[0], dim=-1)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> list[dict[str, str]]:
        """The most likely class of every label, per image."""
        _, logits = self(pixels)
        names = {name: logits[name].argmax(-1).tolist() for name in self.labels}
        return [{name: self.labels[name][names[name][i]] for name in self.labels} for i in range(pixels.shape[0])]

    # ------------------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, metrics: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        config = {"labels": self.labels, "width": self.features[0][0].out_channels, "metrics": metrics or {}}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ToyEvaluator":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        model = cls(config["labels"], config["width"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval().requires_grad_(False)


def pixels(images: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a uint8 array [N, 64, 64, 3] -> float [N, 3, 64, 64] in [-1, 1]."""
    array = world.to_array(images) if isinstance(images, list) else images
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1


def label_targets(scenes: list[world.Scene], labels: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([classes.index(getattr(s, name)) for s in scenes]) for name, classes in labels.items()}


def accuracy(predictions: list[dict[str, str]], wanted: list[dict[str, str]]) -> dict[str, float]:
    """Per label, the share of images whose prediction equals what was wanted (labels absent from `wanted`: skipped)."""
    hits: dict[str, list[bool]] = {}
    for got, want in zip(predictions, wanted):
        for name, value in want.items():
            hits.setdefault(name, []).append(got[name] == value)
    return {name: float(np.mean(h)) for name, h in hits.items()}
