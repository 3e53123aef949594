"""training.mlp_tiles: each decoder layer's MLP runs over a few tiles of tokens at a time in training, and each
tile is recomputed in the backward pass, so the MLP's wide tensors exist for one tile at a time.

Why the MLP: with gradient checkpointing the peak of a training step is the one layer being recomputed, and most of
that is the MLP's intermediate-width tensors (gate and up projections, their LoRA sums, the activation, the product;
the intermediate width is 5.4× the hidden one in Qwen2.5) — bench/README.md, "alive at the peak". Without
checkpointing, those tensors are kept for every layer. The MLP treats each token on its own, so N tiles give the same
output and gradients with 1/N of them alive; the price is one more MLP forward per layer and step.

Dropout inside the MLP (LoRA dropout) draws its masks tile by tile: the backward pass replays the random state of
the forward, so both see the same masks (other numbers than an untiled run draws, from the same distribution).
The trainable weights are inputs of the tiled function, so their gradients arrive once per step, as
DistributedDataParallel expects.
"""

from __future__ import annotations

import logging

import torch

from align.modeling.compiled import decoder_layers
from align.modeling.recompute import adapter_state, adapters_as, lora_layers
from align.runtime.errors import ModelError

log = logging.getLogger(__name__)


def tile_mlps(model, tiles: int) -> int:
    """Run every decoder layer's `mlp` of `model` in `tiles` tiles of tokens when gradients are computed; returns
    how many MLPs. Parameter names (and so saved adapters and checkpoints) are unchanged."""

    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    if not mlps or any(not isinstance(m, torch.nn.Module) for m in mlps):
        raise ModelError(f"training.mlp_tiles={tiles}: {type(model).__name__} has no decoder layers with an `mlp` "
                         "module (Llama, Qwen, Mistral and Gemma have one); set training.mlp_tiles=1 for this model")
    for mlp in mlps:
        mlp.forward = _tiled_forward(mlp, mlp.forward, tiles)
    log.info("training.mlp_tiles: %d MLPs run in %d tiles of tokens in training", len(mlps), tiles)
    return len(mlps)


def _tiled_forward(mlp: torch.nn.Module, inner, tiles: int):
    layers = lora_layers(mlp)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Looked up on each call: adapter roles (DPO's reference, PPO's value) switch which weights train
        params = [p for p in mlp.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or params) or x.shape[-2] < 2:
            return inner(x)  # nothing is kept for a backward pass: tiling would only cost time
        return _TiledMLP.apply(inner, tiles, adapter_state(layers), x, *params)

    return forward


class _TiledMLP(torch.autograd.Function):
    """y = run(x) over tiles of x's token dimension (-2); keeps x only and recomputes each tile for its gradient."""

    @staticmethod
    def forward(ctx, run, tiles: int, adapters: list[tuple], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.tiles, ctx.adapters = run, tiles, adapters
        ctx.rng = _rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *params)
        outs = [run(part) for part in x.chunk(tiles, dim=-2)]
        if not isinstance(outs[0], torch.Tensor):  # mixture-of-experts blocks also return router logits
            raise ModelError(f"training.mlp_tiles: this model's MLP returns {type(outs[0]).__name__}, not one tensor "
                             "(a mixture-of-experts block?); tiles are for dense MLPs: set training.mlp_tiles=1")
        return torch.cat(outs, dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        want_x = ctx.needs_input_grad[3]
        grads_x: list[torch.Tensor] = []
        grads_p: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        with (torch.random.fork_rng(devices=_rng_devices(x.device), device_type=_rng_device_type(x.device)),
              torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled),
              adapters_as(ctx.adapters)):  # the adapter role of the forward, which may have ended since
            _set_rng_state(x.device, ctx.rng)  # the forward's masks, tile by tile in the same order
            for part, g in zip(x.chunk(ctx.tiles, dim=-2), grad.chunk(ctx.tiles, dim=-2), strict=True):
                part = part.detach().requires_grad_(want_x)
                out = ctx.run(part)
                wrt = ([part] if want_x else []) + params
                found = torch.autograd.grad(out, wrt, g, allow_unused=True)
                if want_x:
                    grads_x.append(found[0])
                    found = found[1:]
                grads_p = [a if b is None else b if a is None else a + b
                           for a, b in zip(grads_p, found, strict=True)]
        return (None, None, None, torch.cat(grads_x, dim=-2) if want_x else None, *grads_p)


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _rng_device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _rng_state(device: torch.device) -> tuple:
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(_rng_devices(device)[0])) if device.type == "cuda" else (cpu,)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], _rng_devices(device)[0])
