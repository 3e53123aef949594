"""Guards every training stage shares: non-finite steps are skipped and counted, a run of them stops training,
an out-of-memory error becomes one message saying what to change, and nothing non-finite is ever saved.

A skipped step drops the gradients (the optimizer then leaves every weight and its moments alone, as torch
optimizers skip parameters without a gradient), so the weights and the last checkpoint stay usable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

from align.runtime.errors import NumericError, OutOfMemory

log = logging.getLogger(__name__)





def nonfinite_grads(params) -> list[str]:
    """Names (or indices) of parameters whose gradient holds a NaN or an infinity."""
    bad = []
    for i, p in enumerate(params):
        name, p = p if isinstance(p, tuple) else (str(i), p)
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(name)
    return bad


class NonFiniteGuard(TrainerCallback):
    """For transformers/TRL trainers: before each optimizer step, a step whose gradients are not finite is
    skipped (gradients dropped) and reported; `max_bad` skipped steps in a row stop training."""

    def __init__(self, stage: str, max_bad: int):
        self.stage, self.max_bad = stage, max_bad
        self.in_row = 0
        self.skipped: list[int] = []
        self.stopped: str | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bad = nonfinite_grads(params)
        step = state.global_step + 1
        if not bad:
            self.in_row = 0
            return
        for _, p in params:
            p.grad = None
        self.in_row += 1
        self.skipped.append(step)
        log.error("%s step %d skipped: non-finite gradients in %d tensors (first: %s)", self.stage, step, len(bad),
                  bad[0])
        if self.in_row >= self.max_bad:
            self.stopped = (f"{self.in_row} {self.stage} steps in a row had non-finite gradients (NaN or inf; last at "
                            f"step {step}). Lower training.learning_rate, check the data for extreme rows, or "
                            "use float32 (model.dtype=float32); the last checkpoint is kept and the same command "
                            "resumes from it")
            control.should_training_stop = True


def out_of_memory(stage: str, batch_size: int, grad_accum: int, max_length: int, where: str,
                  also: str = "") -> OutOfMemory:
    return OutOfMemory(
        f"{stage}: out of memory at training.batch_size={batch_size} (grad_accum {grad_accum}) with sequences up to "
        f"data.max_length={max_length} tokens. Halve training.batch_size and double training.grad_accum (same "
        f"effective batch), or lower data.max_length, or set training.gradient_checkpointing=true{also}; the last "
        f"checkpoint in {where} is kept and the same command resumes from it")


@contextlib.contextmanager
def oom_as_message(stage: str, cfg, where, also: str = "") -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one OutOfMemory message about `cfg`'s settings."""
    try:
        yield
    except Exception as e:
        if is_oom(e):
            t = cfg.training
            raise out_of_memory(stage, t.batch_size, t.grad_accum, cfg.data.max_length, str(where), also) from None
        raise


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def check_finite(named_tensors: Iterator[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to save non-finite weights: a NaN adapter would load fine and answer garbage."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NumericError(f"{what}: {name} holds NaN or inf values; nothing was saved. The last checkpoint "
                               "is kept; lower training.learning_rate and run again")
