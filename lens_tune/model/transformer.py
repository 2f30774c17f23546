"""The Lens MMDiT denoiser: 48 double-stream blocks over packed image tokens and multi-layer text features.

Module names, config keys and the forward signature follow the upstream reference (diffusers PR #13837), so real
checkpoints load unchanged and code written for the reference runs on this class. Facts and their sources are in
`lens-architecture.md`; the numbers are pinned by the golden tests.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, RMSNorm
from diffusers.utils import apply_lora_scale
from torch import nn

from lens_tune.model import loading

# Prefixes under which single-file checkpoints store the denoiser (Comfy-Org files use none)
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.")
ROPE_THETA = 10000.0
BLOCK_EPS = 1e-6  # block norms and, as executed by the reference, the QK norms
TEXT_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------------------
def _axis_frequencies(dim: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rope_angles(
    grid_hw: tuple[int, int], text_len: int, axes_dims: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles (float32) for the image tokens [h*w, D/2] and the text tokens [L, D/2].

    Image token (r, c) sits at frame 0 and at row/column positions centred on the grid (-(n - n//2) .. n//2 - 1).
    Text token k sits at max(h//2, w//2) + k on all three axes, just past the image positions.
    The angles are computed on the fly rather than kept as buffers, so `.to(dtype)` and device moves cannot
    corrupt them.
    """
    h, w = grid_hw
    freqs = [_axis_frequencies(d, device) for d in axes_dims]
    rows = torch.arange(h, device=device, dtype=torch.float32) - (h - h // 2)
    cols = torch.arange(w, device=device, dtype=torch.float32) - (w - w // 2)
    frame = torch.zeros(h * w, device=device)
    img_pos = (frame, rows.repeat_interleave(w), cols.repeat(h))
    img = torch.cat([torch.outer(p, f) for p, f in zip(img_pos, freqs)], dim=-1)

    txt_pos = torch.arange(text_len, device=device, dtype=torch.float32) + max(h // 2, w // 2)
    txt = torch.cat([torch.outer(txt_pos, f) for f in freqs], dim=-1)
    return img, txt


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2j], x[2j+1]) of x [B, S, heads, D] by angles [S, D/2], in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (`gate_mlp=True`)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LensTimestepEmbedding(nn.Module):
    """Sinusoid of 1000*sigma (cos first), then Linear-SiLU-Linear. Time only: Lens has no pooled text."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(sigma).to(dtype))


class LensJointAttention(nn.Module):
    """Joint attention over [image tokens, text tokens] with fused per-stream QKV projections and QK RMSNorm."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = BLOCK_EPS) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.img_qkv = nn.Linear(dim, 3 * inner)
        self.txt_qkv = nn.Linear(dim, 3 * inner)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # a list only so the weight key is `to_out.0.*`
        self.to_add_out = nn.Linear(inner, dim)

    def _project(self, qkv: nn.Linear, norm_q: RMSNorm, norm_k: RMSNorm, x: torch.Tensor, angles: torch.Tensor):
        q, k, v = qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(dim=2)  # each [B, S, heads, D]
        return apply_rope(norm_q(q), angles), apply_rope(norm_k(k), angles), v

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_q, img_k, img_v = self._project(self.img_qkv, self.norm_q, self.norm_k, img, rope[0])
        txt_q, txt_k, txt_v = self._project(self.txt_qkv, self.norm_added_q, self.norm_added_k, txt, rope[1])
        # [B, heads, S_img + S_txt, D], image first
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2)
        n_img = img.shape[1]
        return self.to_out[0](out[:, :n_img]), self.to_add_out(out[:, n_img:])


class LensTransformerBlock(nn.Module):
    """One double-stream block: adaLN-modulated joint attention, then a modulated MLP, per stream."""

    def __init__(self, dim: int, heads: int, head_dim: int, rms_norm: bool = True, gate_mlp: bool = True) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return RMSNorm(dim, eps=BLOCK_EPS) if rms_norm else nn.LayerNorm(dim, eps=BLOCK_EPS, elementwise_affine=False)

        def mlp() -> nn.Module:
            if gate_mlp:
                return SwiGLU(dim, int(dim / 3 * 8))
            return FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

        self.attn = LensJointAttention(dim, heads, head_dim)
        # Sequential(SiLU, Linear) so the weights sit at `img_mod.1.*`, as in the checkpoints
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2, self.img_mlp = norm(), norm(), mlp()
        self.txt_norm1, self.txt_norm2, self.txt_mlp = norm(), norm(), mlp()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = hidden_states, encoder_hidden_states
        # (shift, scale, gate) for attention, then for the MLP; one vector per sample
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            self.img_norm1(img) * (1 + img_mod[1]) + img_mod[0],
            self.txt_norm1(txt) * (1 + txt_mod[1]) + txt_mod[0],
            rope,
            attention_mask,
        )
        img = img + img_mod[2] * img_attn
        txt = txt + txt_mod[2] * txt_attn
        img = img + img_mod[5] * self.img_mlp(self.img_norm2(img) * (1 + img_mod[4]) + img_mod[3])
        txt = txt + txt_mod[5] * self.txt_mlp(self.txt_norm2(txt) * (1 + txt_mod[4]) + txt_mod[3])

        if img.dtype == torch.float16:  # activations outgrow fp16 in later blocks; bf16/fp32 are the real options
            img, txt = img.clamp(-65504, 65504), txt.clamp(-65504, 65504)
        return txt, img  # (text, image), the reference's order


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class LensTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Lens denoiser. Input: packed latent tokens [B, h*w, in_channels]; output: velocity, same shape.

    Config keys are the official ones (`transformer/config.json`). One addition:
    `mask_text_in_all_blocks` (default False). The reference applies the padded-text attention mask in the first
    block only and lets later blocks attend to padded text positions; that is what Lens was trained with and what
    the default reproduces. True masks padded text in every block, as ComfyUI does.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LensTransformerBlock"]
    _repeated_blocks = ["LensTransformerBlock"]  # what diffusers' compile_repeated_blocks() compiles
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 128,
        out_channels: int | None = 32,
        num_layers: int = 48,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        inner_dim: int | None = 1536,
        enc_hidden_dim: int = 2880,
        axes_dims_rope: Sequence[int] = (8, 28, 28),
        gate_mlp: bool = True,
        rms_norm: bool = True,
        multi_layer_encoder_feature: bool = True,
        selected_layer_index: Sequence[int] = (5, 11, 17, 23),
        mask_text_in_all_blocks: bool = False,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if inner_dim is not None and inner_dim != dim:
            raise ValueError(
                f"inner_dim={inner_dim} but num_attention_heads * attention_head_dim = {dim}; "
                "Lens derives the width from the heads, so these must agree."
            )
        if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope={list(axes_dims_rope)} must be even numbers summing to attention_head_dim="
                f"{attention_head_dim}."
            )
        self.out_channels = out_channels or in_channels
        n_text_layers = len(selected_layer_index) if multi_layer_encoder_feature else 1

        self.time_text_embed = LensTimestepEmbedding(dim)
        if multi_layer_encoder_feature:
            self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, eps=TEXT_NORM_EPS) for _ in range(n_text_layers)])
        else:
            self.txt_norm = RMSNorm(enc_hidden_dim, eps=TEXT_NORM_EPS)
        self.txt_in = nn.Linear(enc_hidden_dim * n_text_layers, dim)
        self.img_in = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                LensTransformerBlock(dim, num_attention_heads, attention_head_dim, rms_norm, gate_mlp)
                for _ in range(num_layers)
            ]
        )
        # AdaLayerNormContinuous splits its modulation as (scale, shift), unlike the blocks
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=BLOCK_EPS)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False

    def _text_tokens(self, encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer RMSNorm, concatenation on channels, projection to the model width."""
        if self.config.multi_layer_encoder_feature:
            expected = len(self.config.selected_layer_index)
            if not isinstance(encoder_hidden_states, (list, tuple)) or len(encoder_hidden_states) != expected:
                raise ValueError(
                    f"encoder_hidden_states must be a list of {expected} text-feature tensors (one per selected "
                    f"text-encoder layer {list(self.config.selected_layer_index)}), got "
                    f"{type(encoder_hidden_states).__name__}"
                    + (f" of length {len(encoder_hidden_states)}" if isinstance(encoder_hidden_states, (list, tuple)) else "")
                )
            feats = torch.cat([norm(f) for norm, f in zip(self.txt_norm, encoder_hidden_states)], dim=-1)
        else:
            if not isinstance(encoder_hidden_states, torch.Tensor):
                raise ValueError("multi_layer_encoder_feature=False expects a single text-feature tensor.")
            feats = self.txt_norm(encoder_hidden_states)
        return self.txt_in(feats)

    @staticmethod
    def joint_attention_mask(text_mask: torch.Tensor | None, n_img: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive key mask [B, 1, 1, n_img + L]: 0 for image and valid text keys, -inf for padded text keys.

        None when nothing is padded, which keeps SDPA on its fused kernels.
        """
        if text_mask is None or bool(text_mask.all()):
            return None
        keep = torch.cat([text_mask.new_ones(text_mask.shape[0], n_img), text_mask.bool()], dim=1)
        additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        return additive[:, None, None, :]

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes: Sequence[Sequence[int]] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow-matching velocity.

        Args:
            hidden_states: packed latent tokens [B, h*w, in_channels] (token = row*w + col).
            encoder_hidden_states: list of text features, one [B, L, enc_hidden_dim] per selected encoder layer.
            encoder_hidden_states_mask: bool [B, L], True for valid text tokens; None attends to every token.
            timestep: sigma in [0, 1], shape [B] (the scheduler's timestep / 1000).
            img_shapes: [(1, h, w)], the latent token grid (image size / 16); only the first entry is used.
            attention_kwargs: {"scale": s} scales every LoRA adapter by s for this call.
        """
        batch, n_img, _ = hidden_states.shape
        if img_shapes is None or len(img_shapes) == 0:
            raise ValueError("img_shapes=[(1, h, w)] is required: it gives the token grid for the position embedding.")
        frames, h, w = (int(v) for v in img_shapes[0])
        if frames != 1 or h * w != n_img:
            raise ValueError(
                f"img_shapes[0]={tuple(img_shapes[0])} does not describe {n_img} image tokens (expected (1, h, w) "
                f"with h*w == {n_img})."
            )
        if timestep is None:
            raise ValueError("timestep (sigma in [0, 1], one per sample) is required.")

        img = self.img_in(hidden_states)
        txt = self._text_tokens(encoder_hidden_states)
        temb = self.time_text_embed(timestep.to(img.dtype), img.dtype)
        rope = rope_angles((h, w), txt.shape[1], self.config.axes_dims_rope, img.device)
        mask = self.joint_attention_mask(encoder_hidden_states_mask, n_img, img.dtype)

        for index, block in enumerate(self.transformer_blocks):
            block_mask = mask if index == 0 or self.config.mask_text_in_all_blocks else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                txt, img = self._gradient_checkpointing_func(block, img, txt, temb, rope, block_mask)
            else:
                txt, img = block(img, txt, temb, rope, block_mask)

        output = self.proj_out(self.norm_out(img, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # ------------------------------------------------------------------------------------------------------------
    # Loading. Strict and safetensors-only; see lens_tune.model.loading.
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        device: str | torch.device = "cpu",
    ) -> "LensTransformer2DModel":
        """Load a diffusers-layout folder (config.json + one safetensors file or shards with an index).

        `pretrained_model_name_or_path` is a local folder or a Hub repo id; a pipeline folder (with
        model_index.json) is read from its `transformer/` subfolder.
        """
        folder = loading.resolve_folder(pretrained_model_name_or_path, subfolder, revision)
        if subfolder is None and (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
            folder = folder / "transformer"
        config = loading.read_config(folder)
        files = loading.safetensors_files(folder)
        state_dict = loading.read_safetensors(files, device)
        return cls._from_state_dict(
            config, state_dict, str(folder), torch_dtype, hint="Is config.json from the same model as the weights?"
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        config: dict | str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> "LensTransformer2DModel":
        """Load one safetensors file (Comfy-Org style), with or without a known key prefix.

        Without `config` the architecture is read off the tensor shapes; the RoPE axes and text layers, which
        shapes cannot tell, are the official ones when the shapes are the official model's.
        """
        path = Path(path).expanduser()
        state_dict, _ = loading.strip_known_prefix(
            loading.read_safetensors([path], device), "img_in.weight", SINGLE_FILE_PREFIXES
        )
        if config is None:
            config = cls.config_from_state_dict(state_dict, str(path))
        elif not isinstance(config, dict):
            config_path = Path(config)
            config = loading.read_config(config_path) if config_path.is_dir() else loading.read_config(
                config_path.parent, config_path.name
            )
        return cls._from_state_dict(config, state_dict, str(path), torch_dtype)

    @classmethod
    def _from_state_dict(cls, config: dict, state_dict: dict, source: str, torch_dtype, hint: str = ""):
        model = loading.build_on_meta(cls, config, source)
        if torch_dtype is not None:
            state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
        return loading.load_weights_into(model, state_dict, source, hint)

    @classmethod
    def config_from_state_dict(cls, state_dict: dict, source: str = "checkpoint") -> dict:
        """The config that fits a state dict's shapes (see from_single_file)."""
        if "img_in.weight" not in state_dict or "transformer_blocks.0.attn.norm_q.weight" not in state_dict:
            raise loading.ModelLoadError(
                f"{source} does not look like a Lens transformer checkpoint: it has no 'img_in.weight' or "
                "'transformer_blocks.0.attn.norm_q.weight' under any known prefix "
                f"({', '.join(SINGLE_FILE_PREFIXES)})."
            )
        dim, in_channels = state_dict["img_in.weight"].shape
        head_dim = state_dict["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        text_norms = sorted(int(k.split(".")[1]) for k in state_dict if k.startswith("txt_norm.") and k.count(".") == 2)
        num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks."))
        config = dict(
            patch_size=2,
            in_channels=in_channels,
            out_channels=state_dict["proj_out.weight"].shape[0] // 4,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=dim // head_dim,
            inner_dim=dim,
            enc_hidden_dim=state_dict["txt_in.weight"].shape[1] // max(len(text_norms), 1),
            gate_mlp="transformer_blocks.0.img_mlp.w1.weight" in state_dict,
            rms_norm="transformer_blocks.0.img_norm1.weight" in state_dict,
            multi_layer_encoder_feature=bool(text_norms),
        )
        official = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
        if head_dim == official["attention_head_dim"] and len(text_norms) == len(official["selected_layer_index"]):
            config.update(axes_dims_rope=official["axes_dims_rope"], selected_layer_index=official["selected_layer_index"])
            return config
        raise loading.ModelLoadError(
            f"{source} has a non-official shape (head_dim {head_dim}, {len(text_norms)} text layers), so its RoPE "
            "axes and text-encoder layers cannot be inferred. Pass config= (a config.json path or a dict)."
        )
