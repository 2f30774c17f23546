"""Optimizers, learning-rate schedules and the EMA of the trained weights.

Optimizers (`train.optimizer`), all with `train.weight_decay` (decoupled where the optimizer has a choice):

- `adamw8bit` (default): bitsandbytes AdamW8bit, betas (0.9, 0.999), eps 1e-8. Tensors with fewer than 4096
  elements keep 32-bit state (bitsandbytes' `min_8bit_size`); larger ones use block-wise 8-bit state. Each tensor's
  update is one fused kernel (no multi-tensor kernel exists); the device synchronisation bitsandbytes adds after
  each one is left out (`_bitsandbytes_class`, also for `lion8bit`).
- `adamw`: torch AdamW, same betas/eps, `fused=True` on CUDA (on CPU the fused kernel is far slower), otherwise
  torch's default (the multi-tensor `foreach` path on CUDA).
- `lion8bit`: bitsandbytes Lion8bit, betas (0.9, 0.99). Lion's update is a sign, so every element moves by the full
  lr each step: use a 3-10x lower `learning_rate` than for AdamW (and a 3-10x higher `weight_decay` for the same
  effective decay).
- `adafactor`: transformers Adafactor with the explicit `learning_rate` (`scale_parameter=False,
  relative_step=False, warmup_init=False`), no first moment (beta1 None), factored second moment.
- `prodigy`: prodigyopt Prodigy, which estimates the step size itself; `learning_rate` is a multiplier of that
  estimate and should normally be 1.0 (lower it, e.g. 0.5, only if training is unstable). Uses
  `safeguard_warmup=True, use_bias_correction=True` (the usual LoRA settings) and decoupled weight decay. Its step
  size starts at d0 = 1e-6 and grows geometrically over the first tens of steps (a built-in warmup: on a toy
  quadratic nothing visible happens for ~50 steps), so short runs and long `warmup_steps` suit it poorly.
  It needs float32 trainable parameters: with bf16 ones its first updates (d0 = 1e-6) round away, the distance
  from the initial weights that drives the estimate stays ~0, and the step size can stay at 1e-6 for good.

Exact resume: for every optimizer above, `optimizer.state_dict()` loaded into a fresh optimizer over identical
parameters, followed by the same steps, gives bit-identical parameters (tested in tests/test_optim.py). What the
state dicts hold beyond plain tensors, for whoever serialises them:

- bitsandbytes: the per-parameter `step` is a Python int; the 8-bit tensors (`state1`, `state2`, `qmap1`, `qmap2`,
  `absmax1`, `absmax2`) are nested one level deeper, under `"__bnb_optimizer_quant_state__"` (bitsandbytes'
  FSDP wrapper; `load_state_dict` unwraps it). The uint8 tensors must come back as uint8.
- Prodigy: its adaptive step size lives in the *param group* (`d`, `d_max`, `d_numerator`, `d_denom`, `d_hat`
  floats and the step count `k`), not in the per-parameter state; the groups must be saved too. `p0` (the initial
  value of each parameter) is a 0-d tensor for parameters that started all zero (e.g. LoRA B).
- Adafactor: `step` is an int, `RMS` a 0-d tensor; the state is float32 also for bf16/fp16 parameters, which
  torch's `load_state_dict` would round to the parameter dtype (so no exact resume): `build_optimizer` returns a
  subclass whose `load_state_dict` keeps the saved dtypes.
- torch AdamW: `step` is a float32 tensor (on the parameter's device when fused).

Learning-rate schedule (`build_lr_scheduler`): a `LambdaLR` whose factor is a pure function of the number of optimizer
steps already taken, so `scheduler.state_dict()` (which holds only that count and the base lrs) restores it exactly.
Call `scheduler.step()` once after each `optimizer.step()`. See `lr_factor` for the convention.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Iterable, Iterator

import torch

from lens_tune.logs import quiet_bitsandbytes_notice
from lens_tune.recipe.schema import TrainSettings

__all__ = ["EMA", "build_lr_scheduler", "build_optimizer", "lr_factor"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LION_BETAS = (0.9, 0.99)


# --- bitsandbytes import -----------------------------------------------------------------------------------------


def _bitsandbytes_optim():
    quiet_bitsandbytes_notice()
    import bitsandbytes.optim

    return bitsandbytes.optim


# --- optimizers ----------------------------------------------------------------------------------------------------


@functools.cache
def _bitsandbytes_class(name: str) -> type[torch.optim.Optimizer]:
    """bitsandbytes' optimizer `name` (AdamW8bit, Lion8bit), less its device synchronisation after every tensor.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after each parameter's update, which only its paged state
    needs. A rank-16 LoRA on Lens has about 950 tensors: as many host waits per step, each leaving the GPU idle while
    the next update is launched. Kernels on one stream run in order anyway, so the updates are the same.
    """
    base = getattr(_bitsandbytes_optim(), name)

    class Unsynchronised(base):
        def step(self, closure=None):
            if closure is not None or self.is_paged or not self.initialized:
                return super().step(closure)  # bitsandbytes' own first step sets the optimizer up
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return None

    Unsynchronised.__name__ = Unsynchronised.__qualname__ = name
    return Unsynchronised


def _torch_adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    kwargs = dict(lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    if all(p.is_cuda for p in params):
        # one fused kernel for all parameters; on CPU the fused kernel measured ~20x slower than the default path
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


@functools.cache
def _adafactor_class() -> type[torch.optim.Optimizer]:
    from transformers.optimization import Adafactor

    class ExactResumeAdafactor(Adafactor):
        """transformers' Adafactor, whose `load_state_dict` keeps the saved dtype of each state tensor.

        Adafactor keeps float32 state (`exp_avg_sq_row/col`, `exp_avg_sq`, `exp_avg`, `RMS`) also for bf16/fp16
        parameters, but torch's `Optimizer.load_state_dict` casts every floating-point state tensor to its
        parameter's dtype: a resumed bf16 run would continue from bf16-rounded statistics and diverge from the
        uninterrupted one. Here the float32 state is put back as saved.
        """

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            for saved_id, param in zip(saved_ids, params):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    loaded = self.state[param].get(key)
                    if torch.is_tensor(value) and torch.is_tensor(loaded) and loaded.dtype != value.dtype:
                        self.state[param][key] = value.to(device=loaded.device, copy=True)

    return ExactResumeAdafactor


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer `settings.optimizer` over `params` with `settings.learning_rate` and `settings.weight_decay`
    (see the module docstring for each optimizer's fixed hyper-parameters and its lr scale)."""
    params = list(params)
    if not params:
        raise ValueError("build_optimizer: no parameters to optimise")
    name, lr, weight_decay = settings.optimizer, settings.learning_rate, settings.weight_decay
    if name == "adamw8bit":
        return _bitsandbytes_class("AdamW8bit")(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    if name == "adamw":
        return _torch_adamw(params, lr, weight_decay)
    if name == "lion8bit":
        return _bitsandbytes_class("Lion8bit")(params, lr=lr, betas=LION_BETAS, weight_decay=weight_decay)
    if name == "adafactor":
        return _adafactor_class()(
            params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy prints "Using decoupled weight decay" whenever weight_decay > 0; that is the documented default.
        with contextlib.redirect_stdout(io.StringIO()):
            return Prodigy(
                params,
                lr=lr,
                betas=ADAM_BETAS,
                eps=ADAM_EPS,
                weight_decay=weight_decay,
                decouple=True,
                use_bias_correction=True,
                safeguard_warmup=True,
            )
    raise ValueError(f"unknown optimizer {name!r}")


# --- learning-rate schedule ----------------------------------------------------------------------------------------


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The factor on the peak learning rate used by optimizer step `step` (0-based: the number of optimizer steps
    already taken).

    Warmup: steps 0 .. warmup_steps-1 use (step + 1) / warmup_steps, so the first update already moves the weights
    (lr/warmup_steps, not 0) and the last warmup step uses the full lr. After warmup:
    - constant: 1;
    - linear: 1 - p, and cosine: (1 + cos(pi * p)) / 2, with p = (step - warmup_steps) / (total_steps - warmup_steps),
      so both start at 1 right after warmup and reach exactly 0 at step == total_steps, i.e. the value the scheduler
      holds after the last optimizer step; the last update (step total_steps - 1) still has a small non-zero lr.
      They stay 0 beyond total_steps.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown lr schedule {schedule!r}")
    if schedule != "constant" and step >= total_steps:
        return 0.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1): step < total_steps here
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """`settings.lr_scheduler` with `settings.warmup_steps` of linear warmup over `settings.steps` optimizer steps
    (see `lr_factor`). Call `.step()` once per optimizer step. The factor is a closure, so `state_dict()` holds only
    the step count, the base lrs and the last lrs (plain numbers) and `load_state_dict` resumes exactly."""
    schedule, warmup, total = settings.lr_scheduler, settings.warmup_steps, settings.steps

    def factor(step: int) -> float:
        return lr_factor(step, schedule, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- EMA -----------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of `params`, kept as float32 shadow copies on the parameters' devices.

    Call `update()` after each optimizer step. Update n (0-based: n updates done before it) uses the decay
    `min(decay, (1 + n) / (10 + n))`: 0.1, 0.18, 0.25, ... so the average is not dominated by the initial weights
    early in training; the configured decay takes over after about 2 / (1 - decay) updates (2000 for 0.999).
    shadow <- d * shadow + (1 - d) * param.

    `swapped_in()` temporarily puts the averaged weights into the live parameters (validation samples, the final
    adapter) and restores the trained ones afterwards; `copy_to()` writes them for good.
    `state_dict()` is `{"num_updates": int, "shadow.0": tensor, "shadow.1": tensor, ...}` (one per parameter, in
    the order given).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = list(params)
        if not self.params:
            raise ValueError("EMA: no parameters")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def current_decay(self) -> float:
        """The decay the next `update()` will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        live = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, live, weight)
        self.num_updates += 1

    def _targets(self, params: Iterable[torch.nn.Parameter] | None) -> list[torch.Tensor]:
        targets = self.params if params is None else list(params)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, got {len(targets)} parameters")
        for i, (p, s) in enumerate(zip(targets, self.shadow)):
            if p.shape != s.shape:
                raise ValueError(f"EMA tensor {i} has shape {tuple(s.shape)}, parameter has {tuple(p.shape)}")
        return targets

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Overwrite `params` (default: the tracked ones) with the averaged weights (cast to their dtype)."""
        for p, s in zip(self._targets(params), self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped_in(self, params: Iterable[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Within the block, `params` (default: the tracked ones) hold the averaged weights; on exit (also on an
        exception) they get back exactly the values they had before."""
        targets = self._targets(params)
        with torch.no_grad():
            backup = [p.detach().clone() for p in targets]
            for p, s in zip(targets, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(targets, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        state: dict[str, torch.Tensor | int] = {"num_updates": self.num_updates}
        for i, s in enumerate(self.shadow):
            state[f"shadow.{i}"] = s.detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        expected = {"num_updates", *(f"shadow.{i}" for i in range(len(self.shadow)))}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"EMA state does not match {len(self.shadow)} parameters (missing {missing}, extra {extra})"
            )
        for i, s in enumerate(self.shadow):
            value = state[f"shadow.{i}"]
            if value.shape != s.shape:
                raise ValueError(f"EMA state shadow.{i} has shape {tuple(value.shape)}, expected {tuple(s.shape)}")
            s.copy_(value)
        self.num_updates = int(state["num_updates"])
