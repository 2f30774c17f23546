"""`lens-tune run`: from a recipe to a trained adapter. The whole training loop is in `train()`, top to bottom.

Phases: caches (lens_tune.data.prepare) -> base model + adapter -> baseline samples -> steps (with validation
samples and checkpoints) -> final adapter. Several processes (accelerate) split each step's micro-batches; caching,
sampling and writing happen on the main process only.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lens_tune.data.cache import FeatureCache, folder_fingerprint
from lens_tune.data.prepare import PreparedData, prepare_training_data
from lens_tune.errors import LensTuneError
from lens_tune.faults import fault_point
from lens_tune.model.sources import locate_model
from lens_tune.recipe.lock import check_lock, locked, write_lock
from lens_tune.recipe.schema import Recipe
from lens_tune.train.adapters import (
    add_adapter,
    adapter_state_dict,
    check_adapter_settings,
    save_adapter,
    set_adapter_state_dict,
)
from lens_tune.train.base import load_base
from lens_tune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lens_tune.train.data import MicroBatchStream, Prefetcher, load_batch, micro_batch_seed
from lens_tune.train.objective import flow_matching_loss
from lens_tune.train.optim import EMA, build_lr_scheduler, build_optimizer
from lens_tune.train.run_folder import RunFolder, check_writable
from lens_tune.train.samples import ValidationSampler


class TrainingStopped(LensTuneError):
    """Too many consecutive non-finite losses."""


@dataclass
class RunResult:
    run: Path
    step: int
    state: str  # finished or interrupted


class StopRequest:
    """SIGINT/SIGTERM handling for a whole run.

    While the data is prepared (caching, class images) a signal stops at once: KeyboardInterrupt, and what was
    cached so far stays cached. Once `deferring` is set (the model phases), a signal asks the loop to finish the
    current step or sample, write a checkpoint and exit; a second Ctrl-C then exits at once.
    """

    def __init__(self):
        self.requested = False
        self.deferring = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.deferring or (self.requested and signum == signal.SIGINT):
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_dtypes(recipe: Recipe, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None)."""
    on_gpu = device.type == "cuda"
    weights = torch.bfloat16 if recipe.model.dtype == "bf16" or (recipe.model.dtype == "auto" and on_gpu) else torch.float32
    autocast = recipe.train.mixed_precision == "bf16" or (recipe.train.mixed_precision == "auto" and on_gpu)
    return weights, (torch.bfloat16 if autocast else None)


def train(
    recipe: Recipe, runs_dir: Path | None = None, resume: Path | None = None, checkpoint: Path | None = None,
    device: torch.device | None = None, log=print,
) -> RunResult:
    """Run a recipe, or resume the run folder `resume` from `checkpoint` (default: its newest complete one).

    An error raised once the run folder exists carries it as `error.run_folder` (the CLI prints the resume command).
    """
    with StopRequest() as stop:
        return _train(recipe, runs_dir, resume, checkpoint, device, log, stop)


def _train(recipe, runs_dir, resume, checkpoint, device, log, stop: StopRequest) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    on_cpu = (device is not None and device.type == "cpu") or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu,  # several CPU processes then talk through gloo
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    device = accelerator.device
    main = accelerator.is_main_process
    say = log if main else (lambda *_: None)
    settings = recipe.train
    weights_dtype, autocast_dtype = resolve_dtypes(recipe, device)

    # -- the run folder (main process) and the caches (main first; the others then find everything cached) -------
    model_root = locate_model(recipe.model.source, recipe.model.revision)
    run = RunFolder.open(resume) if resume else None
    if run is None:
        check_adapter_settings(recipe.lora, model_root / "transformer")  # a wrong lora.targets or lora.blocks, too
        if main:
            check_writable(runs_dir or recipe.output.dir)  # before minutes of caching, not after
    with accelerator.main_process_first():
        prepared: PreparedData = prepare_training_data(recipe, device=device, log=say)
    if recipe.lock is not None:
        for drift in check_lock(recipe, prepared.fingerprint):
            say(f"note: {drift}")
    if main and run is None:
        run = RunFolder.create(runs_dir or recipe.output.dir, recipe.output.name or "run")
        write_lock(locked(recipe, prepared.fingerprint, folder_fingerprint(model_root / "transformer")),
                   run.path / "recipe.lock.yaml")
    run_path = broadcast_path(accelerator, run.path if main else None)
    run = RunFolder.open(run_path)
    if main:
        run.acquire()
    stop.deferring = True  # from here a signal ends the current step or sample and writes a checkpoint

    step = 0
    try:
        # -- model, adapter, optimizer ------------------------------------------------------------------------------
        transformer, host_modulation = load_base(recipe, model_root, device, weights_dtype)
        if settings.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        torch.manual_seed(settings.seed)  # the adapter's random initialisation (LoRA A) is part of the run's identity
        params = add_adapter(transformer, recipe.lora)
        if settings.compile_blocks:  # each block's module, so state-dict keys, adapters and checkpointing are unchanged
            transformer.compile_repeated_blocks()
        optimizer = build_optimizer(params, settings)
        scheduler = build_lr_scheduler(optimizer, settings)
        ema = EMA(params, settings.ema_decay) if settings.ema else None
        # step: optimizer steps done; attempts: steps tried, skipped non-finite ones included (it indexes the data)
        step, attempts, nonfinite = 0, 0, 0
        checkpoint_path = (checkpoint or latest_checkpoint(run.checkpoints_dir)) if resume else None
        if checkpoint_path is not None:
            saved = load_checkpoint(checkpoint_path)
            set_adapter_state_dict(transformer, saved.states["adapter"])
            optimizer.load_state_dict(saved.states["optimizer"])
            scheduler.load_state_dict(saved.states["scheduler"])
            if ema is not None:
                ema.load_state_dict(saved.states["ema"])
            step, attempts, nonfinite = (saved.states["trainer"][k] for k in ("step", "attempts", "nonfinite"))
        if resume:  # the events after the checkpoint (all of them without one) belong to the lost attempt
            if main:
                run.truncate_events_after(step)
                run.log_event("resume", step=step, checkpoint=str(checkpoint_path) if checkpoint_path else None)
            say(f"resumed from {checkpoint_path} at step {step}" if checkpoint_path else
                "no complete checkpoint in this run yet: starting it again from step 0")
        model, optimizer = accelerator.prepare(transformer, optimizer)

        cache = FeatureCache(prepared.cache_dir)
        stream = MicroBatchStream(prepared.examples, settings.batch_size, settings.seed)
        config = transformer.config
        text_shape = (len(config.selected_layer_index), config.enc_hidden_dim)
        sampler = ValidationSampler(recipe, prepared.prompt_keys, cache, model_root, device) if main else None
        processes, accumulation = accelerator.num_processes, settings.gradient_accumulation

        def micro_batch_index(attempt: int, micro: int) -> int:  # this process's share of the global stream
            return (attempt * processes + accelerator.process_index) * accumulation + micro

        batches = Prefetcher(lambda index: load_batch(
            stream[index], cache, torch.Generator().manual_seed(micro_batch_seed(settings.seed, index)), device,
            weights_dtype, text_shape, settings, host_modulation))

        def stop_requested() -> bool:  # every process must leave the loop at the same step
            if processes == 1:
                return stop.requested
            flag = torch.tensor(float(stop.requested), device=device)
            return accelerator.reduce(flag, reduction="sum").item() > 0

        def write_checkpoint(final: bool = False) -> Path | None:
            if main:
                path = save_checkpoint(
                    run.checkpoints_dir, step,
                    write_adapter=lambda folder: save_adapter(transformer, folder, recipe.lora),
                    # the adapter twice: as files other tools read, and as the exact training state resume reads
                    states={"adapter": adapter_state_dict(transformer),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "ema": ema.state_dict() if ema else None,
                            "trainer": {"step": step, "attempts": attempts, "nonfinite": nonfinite}},
                    keep_last=recipe.checkpoint.keep_last, protect=[settings.steps],
                )
                run.sync()
                run.log_event("checkpoint", step=step, path=str(path.relative_to(run.path)), final=final)
            accelerator.wait_for_everyone()
            return path if main else None

        def render_samples() -> None:
            if main and recipe.validation.prompts:
                with (ema.swapped_in() if ema else nullcontext()):
                    paths = sampler.render(transformer, run.samples_dir(step))
                run.log_event("sample", step=step, images=[str(p.relative_to(run.path)) for p in paths])
            accelerator.wait_for_everyone()

        # -- training -------------------------------------------------------------------------------------------------
        board = tensorboard_writer(run.path) if main and settings.tensorboard else None
        if main:
            run.set_status("running", step=step, total_steps=settings.steps)
            run.log_event("phase", name="training", step=step, total_steps=settings.steps, processes=processes)
        say(f"== training: {settings.steps} steps, {len(stream)} micro-batches per epoch, batch {settings.batch_size} "
            f"x accumulation {accumulation} x {processes} process(es); run folder {run.path}")
        if step == 0 and recipe.validation.before_training:
            render_samples()
        progress = tqdm(total=settings.steps, initial=step, desc="training", unit="step", disable=not main)
        state = "finished"
        model.train()
        while step < settings.steps:
            if stop_requested():  # a signal during the baseline samples
                state = "interrupted"
                break
            started = time.perf_counter()
            total_loss = torch.zeros((), device=device)
            for micro in range(accumulation):
                index = micro_batch_index(attempts, micro)
                torch.manual_seed(micro_batch_seed(settings.seed, index) + 1)  # adapter dropout
                batch = batches.get(index)
                if host_modulation is not None:
                    host_modulation.supply(batch.modulation)
                sync = micro == accumulation - 1
                with (nullcontext() if sync else accelerator.no_sync(model)), torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    loss = flow_matching_loss(model, batch.latents, batch.text, batch.text_mask, batch.grid,
                                              batch.weights, batch.sigma, batch.noise) / accumulation
                    if fault_point("loss"):
                        loss = loss * float("nan")
                    accelerator.backward(loss)
                # the GPU is still busy with this backward: load the next micro-batch meanwhile
                batches.prefetch(micro_batch_index(attempts + 1, 0) if sync else index + 1)
                total_loss += loss.detach()
                fault_point("micro")
            if fault_point("grad"):
                next(p for p in params if p.grad is not None).grad.fill_(float("nan"))
            attempts += 1
            # The norm of all gradients (clipping to max_grad_norm when set): a NaN/inf gradient with a finite loss
            # must not reach the optimizer either. (With a non-finite loss it is non-finite too; the step is skipped.)
            grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm or math.inf)
            # The step's one host synchronisation: whether to skip it must be known before optimizer.step(), and
            # bitsandbytes' optimizers cannot skip a step on the device. The logged values come with the same read.
            step_loss, grad_norm = torch.stack([accelerator.reduce(total_loss, reduction="mean"), grad_norm]).tolist()
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                if main:
                    run.log_event("nonfinite", step=step, consecutive=nonfinite,
                                  what="loss" if not math.isfinite(step_loss) else "gradients")
                if nonfinite >= settings.max_nonfinite_steps:
                    raise TrainingStopped(
                        f"{nonfinite} consecutive steps had a non-finite loss or gradients (NaN/inf) at step {step}; "
                        "stopped. Lower train.learning_rate or check the data; the last good checkpoint is in "
                        f"{run.checkpoints_dir}."
                    )
                continue
            nonfinite = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            seconds = time.perf_counter() - started
            if main:
                run.log_event("step", step=step, loss=step_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              step_time=seconds, samples_per_s=settings.batch_size * accumulation * processes / seconds,
                              peak_memory_gib=peak_memory_gib(device))
                if board is not None:
                    board.add_scalar("loss", step_loss, step)
                    board.add_scalar("lr", scheduler.get_last_lr()[0], step)
                    board.add_scalar("grad_norm", grad_norm, step)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                progress.update()
            last = step == settings.steps
            if step % recipe.validation.every == 0 and not last:
                render_samples()
            stopping = stop_requested() and not last
            if (step % recipe.checkpoint.every == 0 and not last) or stopping:
                write_checkpoint()
            if stopping:
                state = "interrupted"
                break
        progress.close()
        if board is not None:
            board.close()

        # -- the end --------------------------------------------------------------------------------------------------
        if state == "finished":
            write_checkpoint(final=True)
            render_samples()
            if main:
                with (ema.swapped_in() if ema else nullcontext()):
                    save_adapter(transformer, run.adapter_dir, recipe.lora, metadata={"steps": str(step)})
        if main:
            run.set_status(state, step=step, total_steps=settings.steps)
            run.log_event("phase", name=state, step=step)
            run.release()
        accelerator.wait_for_everyone()
        return RunResult(run.path, step, state)
    except BaseException as error:  # the run folder says what happened, also for the dashboard
        error.run_folder = run.path
        if main:
            try:
                run.log_event("error", kind=type(error).__name__, message=str(error), step=step)
                run.set_status("interrupted" if isinstance(error, KeyboardInterrupt) else "failed", step=step,
                               total_steps=settings.steps, error=str(error))
            except OSError as report_error:  # e.g. the disk is full: never hide the original error behind this one
                print(f"note: could not record the error in {run.path}: {report_error}", file=sys.stderr)
            finally:
                run.release()
        if accelerator.num_processes > 1 and is_peer_failure(error):
            stopped = LensTuneError(f"another training process of this run stopped, so this one stopped too "
                                    f"({str(error).splitlines()[0][:200]}); its checkpoints are intact")
            stopped.run_folder = run.path
            raise stopped from error
        raise


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another process of the run died (torch.distributed's errors, or gloo's
    and NCCL's plain RuntimeErrors about the lost connection)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed"))
    )


def tensorboard_writer(run_path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LensTuneError(
            "train.tensorboard is on but TensorBoard is not installed: pip install tensorboard "
            "(or set train.tensorboard: false; events.jsonl has the same numbers)."
        ) from None
    return SummaryWriter(log_dir=str(run_path / "tensorboard"))


def broadcast_path(accelerator, path: Path | None) -> Path:
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
