"""A forward made under one adapter role and differentiated after the role ended (PPO's value model) gets the
gradients of a plain forward, also where the backward pass recomputes it: gradient checkpointing, tiled MLPs."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from align.modeling.models import adapter_role
from align.modeling.recompute import checkpoint_follows_adapters
from align.modeling.tiled import tile_mlps

ROLES = ("default", "value")


def value_gradients(model_dir, recompute: str) -> dict[str, torch.Tensor]:
    """Two trainable adapters with different random weights; the loss is made as `value`, backward runs after."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False)
    if recompute == "checkpoint, plain":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.add_adapter("value", lora)
    if recompute == "checkpoint, following":
        base.enable_input_require_grads()
        checkpoint_follows_adapters(model)
    if recompute == "tiled":
        tile_mlps(model, 3)
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with adapter_role(model, "value", ROLES):
        logits = model(input_ids=ids).logits
    assert model.active_adapter == "default"  # the role has ended before the backward pass
    (logits.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".value." in n and p.grad is not None}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() / a[k].abs().max().clamp(min=1e-12).item() for k in a)


@pytest.mark.parametrize("recompute", ["checkpoint, following", "tiled"])
def test_recomputation_uses_the_adapter_of_its_forward(tiny_model_dir, recompute):
    plain = value_gradients(tiny_model_dir, "none")
    assert largest_difference(plain, value_gradients(tiny_model_dir, recompute)) < 1e-4


def test_plain_checkpointing_would_recompute_with_the_wrong_adapter(tiny_model_dir):
    """Why checkpoint_follows_adapters exists: without it the value adapter's gradients come out wrong."""
    plain = value_gradients(tiny_model_dir, "none")
    assert largest_difference(plain, value_gradients(tiny_model_dir, "checkpoint, plain")) > 1e-2
