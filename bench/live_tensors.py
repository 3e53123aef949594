"""Peak bytes of live tensors, and what they were, counted at the dispatcher: the same reading on a CPU as on a GPU.

On a GPU, torch.cuda.max_memory_allocated gives the peak but not its make-up; on a CPU there is no such counter at
all. LiveTensors gives both, for eager code: storages made inside compiled graphs (torch.compile, training.compile)
never pass through the dispatcher, and dynamo runs eagerly while a dispatch mode is active, so a compiled run is
measured as its eager equivalent. Per-op bookkeeping in Python slows a step: use it in runs of its own, not in timed
ones.
"""

from __future__ import annotations

from contextlib import contextmanager

GIB = 2 ** 30


class LiveTensors:
    """Peak bytes of tensor storages alive at once: every storage an operator makes (through the dispatcher) plus
    those of the model given, each counted once and until it is freed (a weak reference's callback). The CPU
    counterpart of torch.cuda.max_memory_allocated; torch's MemTracker works the same way but insists on hooking
    every parameter's gradient, which frozen LoRA bases refuse.

    `at_peak` says what was alive at (within SNAP of) the peak, grouped by the operator that made each storage and
    the tensor's shape: the composition a memory change has to attack."""

    SNAP = 1.005  # a new breakdown only when the peak grew by 0.5%: a few hundred, not one per new byte

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.live: dict[int, tuple[object, int, str]] = {}
        self.now = self.peak = self.snapped = 0
        self.at_peak: dict[str, list[int]] = {}
        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter.add(out, str(func.overloadpacket.__name__))
                return out

        self.mode = Mode()

    def add(self, obj, made_by: str = "weights") -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(obj)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self.live or st.nbytes() == 0:
                continue
            label = f"{made_by} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            self.live[key] = (weakref.ref(st, lambda _ref, key=key: self._freed(key)), st.nbytes(), label)
            self.now += st.nbytes()
            if self.now > self.peak:
                self.peak = self.now
                if self.peak > self.snapped * self.SNAP:
                    self._snap()

    def _snap(self) -> None:
        groups: dict[str, list[int]] = {}
        for _ref, nbytes, label in self.live.values():
            g = groups.setdefault(label, [0, 0])
            g[0] += 1
            g[1] += nbytes
        self.at_peak, self.snapped = groups, self.peak

    def top(self, n: int = 12) -> list[dict]:
        """The n largest groups alive at the peak: made by, dtype and shape; how many; GiB."""
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"what": label, "count": c, "gib": b / GIB} for label, (c, b) in rows]

    def _freed(self, key: int) -> None:
        _ref, nbytes, _label = self.live.pop(key, (None, 0, ""))
        self.now -= nbytes


def compiles(overrides: list[str]) -> bool:
    """Whether align overrides turn training.compile on: a reading LiveTensors cannot take (eager code only)."""
    return any(o.startswith("training.compile=") and o.split("=", 1)[1].strip().lower() in ("true", "1", "yes")
               for o in overrides)


@contextmanager
def metered_training(found: dict):
    """Inside it, every Trainer.train is metered by LiveTensors: `found` gets the peak bytes of live tensors
    (weights, gradients, optimizer states, activations, temporaries), the weights' share and what was alive at the
    peak. Work done before train() (align's DPO reference pass, no_grad) is not inside it."""
    from transformers import Trainer

    inner = Trainer.train

    def train(self, *args, **kwargs):
        meter = LiveTensors()
        meter.add([*self.model.parameters(), *self.model.buffers()])
        found["weights"] = meter.now
        with meter.mode:
            out = inner(self, *args, **kwargs)
        found["peak"] = meter.peak
        found["at_peak"] = meter.top()
        return out

    Trainer.train = train
    try:
        yield found
    finally:
        Trainer.train = inner


def at_peak_lines(title: str, groups: list[dict]) -> list[str]:
    """A markdown table of LiveTensors.top()'s groups under a title."""
    return ["", f"Alive at the peak, {title} (largest groups: the operator that made each storage, dtype and shape):",
            "", "| made by, dtype, shape | count | GiB |", "| --- | --- | --- |",
            *(f"| {g['what']} | {g['count']} | {g['gib']:.3f} |" for g in groups)]
