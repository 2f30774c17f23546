"""Rebuild lens-toy from a seed: the world, the VAE, the transformer and the evaluator, trained on a CPU.

    python -m lens_tune.toy.build --seed 0 --out lens_tune/toy/weights

Writes OUT/lens-toy/ (a Lens pipeline folder: `LensPipeline.from_pretrained` reads it), OUT/evaluator/ and
OUT/build.json (settings, seconds per phase, the evaluator's held-out accuracy, the base model's prompt accuracy).

Phases, each with a progress bar:
1. world: render the captioned base world and the wide world (new shapes, colours, textures), every picture a pure
   function of (seed, index);
2. VAE: train `AutoencoderKLFlux2` to reconstruct both, then set its BatchNorm statistics from the base world's
   patchified latents, as the real model's are measured on its data;
3. text: the word-level tokenizer and the frozen random GPT-OSS encode every caption;
4. transformer: `LensTransformer2DModel` from scratch with the project's flow-matching objective
   (`lens_tune.train.objective`: fine-tuning's loss and sigma sampling, `--transformer-logit-mean` moving its
   centre), keeping an EMA of the weights;
5. evaluator: a small CNN on the wide world's labels, clean pictures and their VAE reconstructions;
6. checks: the evaluator on held-out pictures; the base model drawing held-out captions, read by the evaluator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lens_tune.model.latents import VAE_SCALE_FACTOR, pack_latents, patchify
from lens_tune.toy import components, world
from lens_tune.toy.evaluator import ToyEvaluator, accuracy, label_targets, pixels

GRID = (world.IMAGE_SIZE // VAE_SCALE_FACTOR,) * 2  # 4x4 image tokens


@dataclass
class BuildSettings:
    """Sizes of everything trained; the defaults are what ships (see build.json for the time they took)."""

    seed: int = 0
    base_images: int = 16000  # captioned pictures: the transformer's training set
    wide_images: int = 8000  # pictures with new shapes, colours and textures: VAE and evaluator only
    held_out: int = 600  # fresh pictures of each world for the checks
    reconstructions: int = 4000  # of each world, through the VAE, for the evaluator
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_object_weight: float = 8.0  # extra loss weight on the object's pixels: small shapes matter as much as backgrounds
    transformer_steps: int = 3000
    transformer_batch: int = 64
    transformer_lr: float = 1e-3
    # Centre of the logit-normal sigma sampling. The shipped v1 used fine-tuning's 0 and draws blobs (shape accuracy
    # 0.32); 1.0 trains more where shapes are decided and draws them better (0.46) at the same cost, but the DreamBooth
    # recipe needs re-tuning on that base before it ships (benchmarks/RESULTS.md).
    transformer_logit_mean: float = 0.0
    caption_dropout: float = 0.1  # unconditional examples, so classifier-free guidance works
    ema_decay: float = 0.998
    evaluator_steps: int = 1200
    evaluator_batch: int = 64
    evaluator_lr: float = 2e-3
    check_prompts: int = 100  # held-out captions the base model draws for the final check
    sample_steps: int = 20
    guidance: float = 4.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(params, lr: float, total: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, max(1, total // 20)))
    return optimizer, schedule


# ----------------------------------------------------------------------------------------------------------------
# 1. World
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Pictures:
    scenes: list[world.Scene]
    images: np.ndarray  # uint8 [N, 64, 64, 3]
    masks: np.ndarray  # uint8 [N, 64, 64], 255 where the object is


def render_world(seed: int, indices: range, wide: bool, desc: str) -> Pictures:
    scenes = [world.scene(seed, i, wide=wide) for i in indices]
    drawn = [world.render(s, with_mask=True) for s in tqdm(scenes, desc=desc, unit="image", leave=False)]
    return Pictures(scenes, world.to_array([d[0] for d in drawn]), np.stack([np.asarray(d[1]) for d in drawn]))


# ----------------------------------------------------------------------------------------------------------------
# 2. VAE
# ----------------------------------------------------------------------------------------------------------------
def train_vae(vae, images: np.ndarray, masks: np.ndarray, settings: BuildSettings, generator: torch.Generator) -> list[float]:
    """L1 + L2 reconstruction of posterior samples, weighted up on the object, plus a small KL term that keeps the
    latent smooth."""
    optimizer, schedule = _optimizer(vae.parameters(), settings.vae_lr, settings.vae_steps)
    vae.train().to(memory_format=torch.channels_last)  # about 30% faster convolutions on a CPU
    losses = []
    for _ in tqdm(range(settings.vae_steps), desc="VAE", unit="step"):
        rows = torch.randint(len(images), (settings.vae_batch,), generator=generator).numpy()
        x = pixels(images[rows]).contiguous(memory_format=torch.channels_last)
        weight = 1 + settings.vae_object_weight * torch.from_numpy(masks[rows]).float()[:, None] / 255
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        error = y - x
        loss = ((error.abs() + error.square()) * weight).mean() + settings.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    vae.to(memory_format=torch.contiguous_format)
    return losses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means [N, c, 8, 8] (what the trainer's latent cache stores)."""
    vae.eval()
    return torch.cat([vae.encode(pixels(images[i:i + batch])).latent_dist.mode()
                      for i in tqdm(range(0, len(images), batch), desc="latents", unit="batch", leave=False)])


def set_batch_norm_statistics(vae, latents: torch.Tensor) -> None:
    """The VAE's BatchNorm running statistics from the patchified latents of the data (the real model's convention)."""
    patches = patchify(latents).transpose(0, 1).flatten(1)  # [4c, N*h*w]
    with torch.no_grad():
        vae.bn.running_mean.copy_(patches.mean(dim=1))
        vae.bn.running_var.copy_(patches.var(dim=1))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Raw latents -> uint8 pictures [N, 64, 64, 3]."""
    out = []
    for i in tqdm(range(0, len(latents), batch), desc="reconstructions", unit="batch", leave=False):
        decoded = vae.decode(latents[i:i + batch]).sample.clamp(-1, 1)
        out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------------
# 3. Text
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TextTable:
    """Every caption's features, padded: features [U, layers, L, H], lengths [U]."""

    captions: list[str]
    features: torch.Tensor
    lengths: torch.Tensor

    def batch(self, ids: torch.Tensor, dropped: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features and mask for caption ids; dropped rows get Lens's unconditional input (zeros, no valid token)."""
        lengths = torch.where(dropped, 0, self.lengths[ids])
        width = max(int(self.lengths[ids].max()), 1)
        mask = torch.arange(width)[None] < lengths[:, None]
        feats = self.features[ids, :, :width] * mask[:, None, :, None]
        return list(feats.unbind(1)), mask


@torch.no_grad()
def encode_captions(tokenizer, encoder, captions: list[str], batch: int = 128) -> TextTable:
    from lens_tune.model.text_encoder import chat_prefix_length, encode_text

    offset = chat_prefix_length(tokenizer)
    layers = components.TRANSFORMER_CONFIG["selected_layer_index"]
    chunks, lengths = [], []
    for i in tqdm(range(0, len(captions), batch), desc="text features", unit="batch", leave=False):
        feats, mask = encode_text(tokenizer, encoder, captions[i:i + batch], layers, 512, offset, "cpu")
        chunks.append(torch.stack(feats, dim=1))
        lengths.append(mask.sum(dim=1))
    width = max(c.shape[2] for c in chunks)
    features = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[2])) for c in chunks])
    lengths = torch.cat(lengths)
    features *= (torch.arange(width)[None] < lengths[:, None])[:, None, :, None]  # padding rows are zero
    return TextTable(captions, features, lengths)


# ----------------------------------------------------------------------------------------------------------------
# 4. Transformer
# ----------------------------------------------------------------------------------------------------------------
def zero_init_outputs(transformer) -> None:
    """adaLN-zero (as in DiT): every block starts as the identity and the output as zero, for a stable start."""
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for mod in (block.img_mod[1], block.txt_mod[1]):
                mod.weight.zero_()
                mod.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()


def train_transformer(transformer, tokens: torch.Tensor, caption_ids: torch.Tensor, text: TextTable,
                      settings: BuildSettings, generator: torch.Generator) -> tuple[dict, list[float]]:
    """Flow matching on (latent tokens, caption) pairs; returns the EMA weights and the losses.

    `caption_ids` [N, variants]: each step picks one caption variant per picture, and drops it with
    `caption_dropout`. Sigma and the loss are the fine-tuning trainer's (`lens_tune.train.objective`).
    """
    from lens_tune.recipe.schema import TrainSettings
    from lens_tune.train.objective import flow_matching_loss, sample_sigmas

    sigma_settings = TrainSettings(logit_mean=settings.transformer_logit_mean)  # and fine-tuning's automatic shift
    optimizer, schedule = _optimizer(transformer.parameters(), settings.transformer_lr, settings.transformer_steps)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    transformer.train()
    losses = []
    n, batch = len(tokens), settings.transformer_batch
    weights = torch.ones(batch)
    progress = tqdm(range(settings.transformer_steps), desc="transformer", unit="step")
    for step in progress:
        rows = torch.randint(n, (batch,), generator=generator)
        variant = torch.randint(caption_ids.shape[1], (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < settings.caption_dropout
        feats, mask = text.batch(caption_ids[rows, variant], dropped)
        sigma = sample_sigmas(sigma_settings, batch, GRID[0] * GRID[1], generator)
        noise = torch.randn(tokens[rows].shape, generator=generator)
        loss = flow_matching_loss(transformer, tokens[rows], feats, mask, GRID, weights, sigma, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(settings.ema_decay, (1 + step) / (10 + step))  # short memory early on
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    transformer.eval()
    return ema, losses


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluator
# ----------------------------------------------------------------------------------------------------------------
def train_evaluator(evaluator: ToyEvaluator, images: np.ndarray, scenes: list[world.Scene],
                    settings: BuildSettings, generator: torch.Generator) -> list[float]:
    """Cross-entropy summed over the labels; light pixel noise so that generated pictures' grain does not matter."""
    targets = label_targets(scenes, evaluator.labels)
    optimizer, schedule = _optimizer(evaluator.parameters(), settings.evaluator_lr, settings.evaluator_steps)
    evaluator.train()
    losses = []
    for _ in tqdm(range(settings.evaluator_steps), desc="evaluator", unit="step"):
        rows = torch.randint(len(images), (settings.evaluator_batch,), generator=generator)
        x = pixels(images[rows.numpy()])
        x = x + 0.03 * torch.randn(x.shape, generator=generator)
        _, logits = evaluator(x)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], targets[k][rows]) for k in evaluator.labels)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    evaluator.eval().requires_grad_(False)
    return losses


def evaluator_accuracy(evaluator: ToyEvaluator, images: np.ndarray, scenes: list[world.Scene]) -> dict[str, float]:
    predictions = [p for i in range(0, len(images), 256) for p in evaluator.predict(pixels(images[i:i + 256]))]
    return {k: round(v, 4) for k, v in accuracy(predictions, [s.labels() for s in scenes]).items()}


# ----------------------------------------------------------------------------------------------------------------
# 6. The base model's check: draw held-out captions, read them back
# ----------------------------------------------------------------------------------------------------------------
def prompt_accuracy(pipe, evaluator: ToyEvaluator, scenes: list[world.Scene], settings: BuildSettings) -> dict[str, float]:
    """Each scene's full caption, drawn once (seed = its position), judged on every attribute the caption names."""
    images = []
    for i, s in enumerate(tqdm(scenes, desc="base samples", unit="image", leave=False)):
        images.append(pipe(world.caption(s), height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                           num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance,
                           generator=torch.Generator().manual_seed(i)).images[0])
    wanted = [{k: v for k, v in s.labels().items() if k != "texture"} for s in scenes]
    return {k: round(v, 4) for k, v in accuracy(evaluator.predict(pixels(images)), wanted).items()}


# ----------------------------------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------------------------------
def build(out: Path, settings: BuildSettings, log=print) -> dict:
    """Build lens-toy into `out` (lens-toy/, evaluator/, build.json); returns the build record."""
    from lens_tune.model.pipeline import LensPipeline

    torch.manual_seed(settings.seed)  # module constructors draw their initial weights from the global RNG
    generator = torch.Generator().manual_seed(settings.seed)
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now
        log(f"{name}: {seconds[name]:.0f} s")

    base = render_world(settings.seed, range(settings.base_images), False, "base world")
    wide = render_world(settings.seed, range(settings.wide_images), True, "wide world")
    end = settings.base_images
    test_base = render_world(settings.seed, range(end, end + settings.held_out), False, "held-out base")
    end = settings.wide_images
    test_wide = render_world(settings.seed, range(end, end + settings.held_out), True, "held-out wide")
    phase("world")

    vae = components.build_vae()
    vae_losses = train_vae(vae, np.concatenate([base.images, wide.images]), np.concatenate([base.masks, wide.masks]),
                           settings, generator)
    latents = encode_latents(vae, base.images)
    set_batch_norm_statistics(vae, latents)
    tokens = pack_latents(latents, vae)
    phase("vae")

    tokenizer = components.build_tokenizer()
    encoder = components.build_text_encoder(tokenizer, settings.seed)
    variants = [world.caption_variants(s, settings.seed, i) for i, s in enumerate(base.scenes)]
    captions = sorted({c for v in variants for c in v})
    index = {c: i for i, c in enumerate(captions)}
    text = encode_captions(tokenizer, encoder, captions)
    caption_ids = torch.tensor([[index[c] for c in v] for v in variants])
    phase("text")

    transformer = components.build_transformer()
    zero_init_outputs(transformer)
    ema, transformer_losses = train_transformer(transformer, tokens, caption_ids, text, settings, generator)
    transformer.load_state_dict(ema)
    phase("transformer")

    # The evaluator learns from clean pictures and from what the VAE makes of them (generated pictures look so).
    n = settings.reconstructions
    recon_base = decode_latents(vae, latents[:n])
    recon_wide = decode_latents(vae, encode_latents(vae, wide.images[:n]))
    eval_images = np.concatenate([base.images, wide.images, recon_base, recon_wide])
    eval_scenes = base.scenes + wide.scenes + base.scenes[:n] + wide.scenes[:n]
    evaluator = ToyEvaluator()
    evaluator_losses = train_evaluator(evaluator, eval_images, eval_scenes, settings, generator)
    phase("evaluator")

    held_out = {}
    for name, test in (("base", test_base), ("wide", test_wide)):
        held_out[f"{name} clean"] = evaluator_accuracy(evaluator, test.images, test.scenes)
        recon = decode_latents(vae, encode_latents(vae, test.images))
        held_out[f"{name} through the VAE"] = evaluator_accuracy(evaluator, recon, test.scenes)
    pipe = LensPipeline(scheduler=components.build_scheduler(), vae=vae.eval(), text_encoder=encoder,
                        tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    base_check = prompt_accuracy(pipe, evaluator, test_base.scenes[:settings.check_prompts], settings)
    phase("checks")

    record = {
        "settings": asdict(settings),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "final_losses": {"vae": float(np.mean(vae_losses[-50:])), "transformer": float(np.mean(transformer_losses[-200:])),
                         "evaluator": float(np.mean(evaluator_losses[-50:]))},
        "distinct_captions": len(captions),
        "evaluator_held_out_accuracy": held_out,
        "base_model_prompt_accuracy": {**base_check, "prompts": settings.check_prompts,
                                       "steps": settings.sample_steps, "guidance": settings.guidance},
    }
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out / "lens-toy")
    evaluator.save(out / "evaluator", metrics=held_out)
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for lens-toy/, evaluator/ and build.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (2 is faster on an idle 2-core machine, far slower on a busy one)")
    for field, default in asdict(BuildSettings()).items():
        if field != "seed":
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = BuildSettings(**{k: getattr(args, k) for k in asdict(BuildSettings())})
    record = build(args.out, settings)
    print(json.dumps({k: record[k] for k in ("seconds", "evaluator_held_out_accuracy", "base_model_prompt_accuracy")}, indent=2))


if __name__ == "__main__":
    main()
