"""LensPipeline: text -> image with Lens, with the reference's call signature, schedule and guidance.

Beyond the reference: loads every known checkpoint layout strictly (safetensors only), computes the chat-prefix
offset from the tokenizer (97 for the real one), and loads LoRA adapters (`load_lora_weights`), several at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open

from lens_tune.checksums import check_tensor_digest
from lens_tune.errors import ModelLoadError
from lens_tune.model import loading
from lens_tune.model.flow_matching import compute_empirical_mu, guided_velocity, inference_sigmas
from lens_tune.model.latents import VAE_SCALE_FACTOR, check_image_size, decode_tokens, load_vae, pixels_to_pil
from lens_tune.model.text_encoder import (
    LensGptOssEncoder,
    chat_prefix_length,
    encode_prompt_pair,
    load_text_encoder,
    load_tokenizer,
)
from lens_tune.model.transformer import LensTransformer2DModel

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
# model_index.json entries of the real Lens repos; save_pretrained writes these so other Lens loaders read our folders
LENS_MODEL_INDEX: dict[str, list[str]] = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LensGptOssEncoder"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "LensTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


@dataclass
class LensPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def align_text_features(
    features: Sequence[torch.Tensor], mask: torch.Tensor, length: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zero-pad text features [B, L, H] and their mask (False) on the right to `length` tokens."""
    extra = length - mask.shape[1]
    if extra == 0:
        return list(features), mask.bool()
    padded = [torch.cat([f, f.new_zeros(f.shape[0], extra, f.shape[2])], dim=1) for f in features]
    return padded, torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1)


class LensPipeline(DiffusionPipeline):
    """Components: `transformer`, `vae`, `text_encoder`, `tokenizer`, `scheduler` (text ones may be None when
    the caller passes precomputed text features)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        text_encoder: LensGptOssEncoder | None,
        tokenizer,
        transformer: LensTransformer2DModel,
    ):
        super().__init__()
        self.register_modules(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self.vae_scale_factor = VAE_SCALE_FACTOR
        self.default_sample_size = 1024
        if tokenizer is not None:
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
        self._adapter_scales: dict[str, float] = {}  # loaded LoRA adapters and their weights
        self.txt_offset = chat_prefix_length(tokenizer) if tokenizer is not None else None
        if text_encoder is not None:
            text_encoder.set_selected_layers(transformer.config.selected_layer_index)

    # ------------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        **components,
    ) -> "LensPipeline":
        """Load a pipeline folder or Hub repo in the Lens layout (model_index.json + one subfolder per component).

        Components passed as keyword arguments are used instead of loading them; pass `text_encoder=None,
        tokenizer=None` to skip the text encoder (sampling from precomputed features). The VAE stays in float32
        when `torch_dtype` is bf16/fp16 (the FLUX.2 VAE config asks for upcasting).
        """
        unknown = set(components) - {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
        if unknown:
            raise TypeError(f"LensPipeline.from_pretrained got unknown arguments: {', '.join(sorted(unknown))}")
        root = loading.resolve_folder(pretrained_model_name_or_path, revision=revision)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise ModelLoadError(
                f"{root} has no model_index.json, so it is not a pipeline folder. For a single transformer file, "
                "use LensTransformer2DModel.from_single_file and pass the other components explicitly."
            )
        index = json.loads(index_path.read_text())
        missing = [name for name in ("transformer", "vae", "scheduler") if name not in index and name not in components]
        if missing:
            raise ModelLoadError(f"{index_path} lists no {', '.join(missing)} component.")

        def sub(name: str) -> Path:
            return loading.resolve_folder(root, name)

        if "transformer" not in components:
            components["transformer"] = LensTransformer2DModel.from_pretrained(sub("transformer"), torch_dtype=torch_dtype, device=device)
        if "vae" not in components:
            components["vae"] = load_vae(sub("vae"), device=device)
        if "scheduler" not in components:
            components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(sub("scheduler"))
        if "tokenizer" not in components:
            components["tokenizer"] = load_tokenizer(sub("tokenizer")) if "tokenizer" in index else None
        if "text_encoder" not in components:
            components["text_encoder"] = (
                load_text_encoder(sub("text_encoder"), dtype=torch_dtype or torch.float32, device=device)
                if "text_encoder" in index
                else None
            )
        return cls(**components)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the pipeline folder (safetensors only) with the real Lens model_index.json entries."""
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update({name: entry for name, entry in LENS_MODEL_INDEX.items() if index.get(name, [None])[0] is not None})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------------------------
    # LoRA adapters (diffusers/PEFT format)
    # ------------------------------------------------------------------------------------------------------------
    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load an adapter into the transformer: a .safetensors file or a folder holding one, in the diffusers/PEFT
        layout (bare or `transformer.` keys), the ComfyUI layout (`diffusion_model.` keys with `.alpha`), or the
        kohya layout other Lens trainers write (`lora_unet_...lora_down/lora_up`); LoRA, DoRA, LoHa or LoKr.

        Every loaded adapter stays active, each with its own scale; returns the adapter's name.
        """
        file = Path(path).expanduser()
        if file.is_dir():
            candidates = [file / name for name in LORA_WEIGHT_NAMES if (file / name).is_file()]
            if not candidates:
                raise ModelLoadError(f"No {' or '.join(LORA_WEIGHT_NAMES)} in {file}.")
            file = candidates[0]
        name = adapter_name or f"adapter_{len(self._adapter_scales)}"
        if name in self._adapter_scales:
            raise ValueError(f"An adapter named '{name}' is already loaded; pick another adapter_name.")
        tensors = loading.read_safetensors([file])
        with safe_open(str(file), framework="pt") as handle:
            check_tensor_digest(tensors, handle.metadata() or {}, file)  # our files record one: a damaged copy fails here
        keys = list(tensors)
        peft_keys = any(".lora_A." in k or ".lora_B." in k for k in keys)
        if peft_keys and not any(k.startswith("diffusion_model.") for k in keys):
            prefix = "transformer" if all(k.startswith("transformer.") for k in keys) else None
            self.transformer.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name=name)
        else:
            from lens_tune.export.formats import read_adapter_file
            from lens_tune.train.adapters import load_adapter_state

            state, info = read_adapter_file(file, [n for n, _ in self.transformer.named_modules()])
            if info["type"] == "lora":
                self.transformer.load_lora_adapter(state, prefix=None, adapter_name=name)  # scale folded: alpha = rank
            else:  # LoHa / LoKr: diffusers' loader reads LoRA only
                load_adapter_state(self.transformer, info["config"], state, name, source=str(file))
                self.transformer.requires_grad_(False)
        self._adapter_scales[name] = float(scale)
        self.set_adapters(list(self._adapter_scales), list(self._adapter_scales.values()))
        return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate the named adapters with the given weights (1.0 each by default)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights or 1.0] * len(names)
        self.transformer.set_adapters(names, weights)
        self._adapter_scales.update(zip(names, (float(w) for w in weights)))

    def unload_lora_weights(self) -> None:
        """Remove every adapter from the transformer."""
        if self._adapter_scales:
            self.transformer.delete_adapters(list(self._adapter_scales))
            self._adapter_scales.clear()

    # ------------------------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] = "",
        num_images_per_prompt: int = 1,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
    ):
        """Text features for prompt and negative: `(prompt_embeds, prompt_mask, negative_prompt_embeds,
        negative_prompt_mask)`, each embeds a list with one [B, L, H] tensor per selected encoder layer."""
        needs_encoder = prompt_embeds is None or (
            negative_prompt_embeds is None and any(str(n).strip() for n in np.atleast_1d(negative_prompt))
        )
        if needs_encoder and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "This pipeline has no text encoder/tokenizer: pass prompt_embeds/prompt_mask (and negative ones for "
                "a non-empty negative prompt), or load it with a text encoder."
            )
        return encode_prompt_pair(
            self.tokenizer,
            self.text_encoder,
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_mask=negative_prompt_mask,
            max_sequence_length=max_sequence_length,
            txt_offset=self.txt_offset,
            device=device or self._execution_device,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    def prepare_latents(self, batch_size, height, width, dtype, device, generator=None, latents=None):
        """Initial noise, drawn directly in packed token layout [B, (H/16)(W/16), in_channels]."""
        shape = (batch_size, (height // VAE_SCALE_FACTOR) * (width // VAE_SCALE_FACTOR), self.transformer.config.in_channels)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {width}x{height}.")
            return latents.to(device=device, dtype=dtype)
        # Drawn in float32 whatever the model dtype: a seed then gives the same image in bf16 and fp32, on any
        # device (torch draws a different stream when asked for bf16 directly).
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        max_sequence_length: int = 512,
    ):
        """Generate images. Arguments as the reference LensPipeline.

        `output_type`: "pil" (list of PIL images), "np" (B, H, W, 3) in [0, 1], "pt" (the VAE decoder's raw output,
        B, 3, H, W) or "latent" (packed tokens). Guidance always runs the [cond; uncond] batch, as the reference.
        `callback_on_step_end(pipe, step, t, {"latents": ...})` may return {"latents": new} to replace them.
        """
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        check_image_size(height, width)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a prompt or prompt_embeds with prompt_mask.")

        device = self._execution_device
        dtype = self.transformer.dtype
        pos, pos_mask, neg, neg_mask = self.encode_prompt(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            prompt_embeds,
            prompt_mask,
            negative_prompt_embeds,
            negative_prompt_mask,
            max_sequence_length,
            device,
        )
        length = max(pos_mask.shape[1], neg_mask.shape[1])
        pos, pos_mask = align_text_features(pos, pos_mask, length)
        neg, neg_mask = align_text_features(neg, neg_mask, length)
        text = [torch.cat([p, n]).to(device=device, dtype=dtype) for p, n in zip(pos, neg)]
        text_mask = torch.cat([pos_mask, neg_mask]).to(device)

        batch = pos_mask.shape[0]
        grid = (height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        latents = self.prepare_latents(batch, height, width, dtype, device, generator, latents)
        mu = compute_empirical_mu(grid[0] * grid[1], num_inference_steps)
        self.scheduler.set_timesteps(sigmas=inference_sigmas(num_inference_steps), device=device, mu=mu)

        with self.progress_bar(total=num_inference_steps) as progress:
            for step, t in enumerate(self.scheduler.timesteps):
                sigma = t.expand(2 * batch).to(latents.dtype) / 1000
                velocity = self.transformer(
                    hidden_states=latents.repeat(2, 1, 1),
                    encoder_hidden_states=text,
                    encoder_hidden_states_mask=text_mask,
                    timestep=sigma,
                    img_shapes=[(1, *grid)],
                    return_dict=False,
                )[0]
                cond, uncond = velocity.chunk(2)
                latents = self.scheduler.step(guided_velocity(cond, uncond, guidance_scale), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    latents = (callback_on_step_end(self, step, t, {"latents": latents}) or {}).get("latents", latents)
                progress.update()

        if output_type == "latent":
            images = latents
        else:
            decoded = decode_tokens(self.vae, latents, grid)
            if output_type == "pt":
                images = decoded
            elif output_type == "np":
                images = ((decoded.clamp(-1, 1) + 1) * 0.5).permute(0, 2, 3, 1).to("cpu", torch.float32).numpy()
            else:
                images = pixels_to_pil(decoded)

        self.maybe_free_model_hooks()
        return LensPipelineOutput(images=images) if return_dict else (images,)
