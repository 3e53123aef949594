"""Work recomputed in the backward pass sees the adapters its forward saw.

Gradient checkpointing and tiled MLPs (training.mlp_tiles) run parts of the forward again inside the backward pass.
LoRA layers read which adapter is active when they run, so a forward made under one adapter role and
differentiated after the role ended (PPO's value model: its forward runs as the value adapter, the one backward of
policy + value loss runs after) would be recomputed with the policy adapter and give the value adapter wrong
gradients. The adapter state is read at forward time and put back for the recomputation.

PEFT's own switches (set_adapter, enable_adapters) also change which weights require gradients, which the
recomputation must not touch, so the state is read and written on the layers' attributes directly.
"""

from __future__ import annotations

import contextlib

import torch


def lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state(layers: list[torch.nn.Module]) -> list[tuple]:
    """Which adapter each layer runs, and whether adapters are off."""
    return [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]


@contextlib.contextmanager
def adapters_as(state: list[tuple]):
    """The layers run with `state`'s adapters inside; afterwards as they were."""
    now = adapter_state([layer for layer, _, _ in state])
    _apply(state)
    try:
        yield
    finally:
        _apply(now)


def _apply(state: list[tuple]) -> None:
    for layer, active, disabled in state:
        layer._active_adapter, layer._disable_adapters = active, disabled


def checkpoint_follows_adapters(model) -> None:
    """Gradient checkpointing of `model` (a PEFT model) that recomputes each layer with the adapters its forward
    used: non-reentrant checkpoints with a context for the recomputation."""
    layers = lora_layers(model)

    def context_fn():
        return contextlib.nullcontext(), adapters_as(adapter_state(layers))

    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
