"""training.compile: each decoder layer through torch.compile, for SFT, the reward model and DPO.

Why per layer and not the whole model: the decoder layers are where the time goes, they all share one piece of
code (so one compilation serves every layer), and they hold nothing that breaks a graph — the 4-bit matmuls are
bitsandbytes custom ops, the LoRA branches plain tensor code. Around them, PEFT's wrappers, the Trainer and the
losses stay eager. On a GPU the gain is fewer, fused kernels: at the 0.5B shape a plain step launches ~10.6k
kernels at ~80 µs of host time each with the GPU busy 16% of the step, and at 7B the casts and element-wise adds
and multiplies around the GEMMs take ~40% of GPU time (bench/README.md, profile); inductor fuses those chains.

`Module.compile()` compiles in place: parameter names, and so saved adapters, checkpoints and resume, are unchanged.
"""

from __future__ import annotations

import logging
import shutil

import torch

from align.runtime.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Variants one layer may need in a run: train / eval, with and without gradients, policy / reference adapter
# (DPO), adapters disabled, for each stage of a whole-loop run in one process; past the limit a layer runs eager.
RECOMPILE_LIMIT = 32


def check_compiler(device: torch.device) -> None:
    """On a CPU, inductor writes C++ and needs a compiler; say so before the model loads rather than mid-step."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ConfigError("training.compile=true on a CPU needs a C++ compiler (g++ or clang++) on PATH; install "
                          "one (Debian/Ubuntu: apt install g++) or set training.compile=false")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a transformers model (any wrapper around it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer of `model` in place; returns how many. The first steps wait for compilation
    (tens of seconds); shapes are compiled as dynamic so that batches of new lengths do not compile again."""
    layers = decoder_layers(model)
    if not layers:
        raise ModelError(f"training.compile=true: no decoder layers found in {type(model).__name__} (transformers "
                         "marks them as GradientCheckpointingLayer); set training.compile=false for this model")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # The first layer's input must need gradients exactly when every later one's does (in training, not under
    # no_grad), or that layer gets graphs of its own: the embeddings' output follows the grad mode
    model.get_input_embeddings().register_forward_hook(_follow_grad_mode)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("training.compile: %d decoder layers compiled with torch.compile (the first steps include "
             "compilation)", len(layers))
    return len(layers)


def _follow_grad_mode(_module, _inputs, output: torch.Tensor) -> None:
    if output.grad_fn is None:  # frozen embeddings (LoRA): their output is a leaf whose flag may be set
        output.requires_grad_(torch.is_grad_enabled())
