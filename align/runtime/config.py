"""Stage configs: typed dataclasses, YAML files, dotted command-line overrides, validation.

Everything here runs before any model or data is touched, so a typo costs a second, not a model load.
A config is built in three steps: the YAML file (or the dataclass defaults), then `key.sub=value`
overrides, then `build()` which checks every key, type and value and names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.runtime.errors import ConfigError


def opt(default: Any, help: str, check: typing.Callable[[Any], bool] | None = None, why: str = "") -> Any:
    """A config field with its help text and an optional value check (`why` says what the check wants)."""
    meta = {"help": help, "check": check, "why": why}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return v > 0


@dataclass
class ModelConfig:
    name_or_path: str | None = opt(
        None, "base model: a local HF directory, a hub id, or a .gguf file; empty = the embedded SmolLM2-135M-Instruct")
    gguf_file: str | None = opt(None, "GGUF file name inside name_or_path, when it is a directory holding one")
    quantization: Literal["auto", "nf4", "none"] = opt(
        "auto", "auto = NF4 4-bit (double quant, bf16 compute) on CUDA, unquantized on CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights/compute dtype of the unquantized parts; auto = bfloat16 on CUDA, float32 on CPU")
    trust_remote_code: bool = opt(False, "run code shipped with a hub model (off unless you trust its author)")
    chat_template: str | None = opt(
        None, "how conversations become text: empty = the tokenizer's own chat template (a base model without one "
        "gets 'plain'); plain = 'User: … / Assistant: …' turns, each answer closed by the tokenizer's EOS (the "
        "token a base model already ends documents with); or a Jinja template file (.jinja)")
    upcast: bool | None = opt(
        None, "4-bit bases: hold the weights that stay unquantized (embeddings, output layer, norms) in float32, as "
        "peft's prepare_model_for_kbit_training does; empty = only for float16 compute. With bfloat16 the float32 "
        "copies only cost memory (2.2 GB for a 7B model's embeddings and output layer): matmuls run in bfloat16 "
        "under autocast either way")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank", _positive, "must be >= 1")
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r)", _positive, "must be > 0")
    dropout: float = opt(0.05, "dropout on the LoRA input", lambda v: 0 <= v < 1, "must be in [0, 1)")
    target_modules: str | list[str] = opt(
        "all-linear", "modules that get adapters: 'all-linear' or a list of module names like [q_proj, v_proj]")


@dataclass
class DataConfig:
    train: str = opt("reward_data/sft/train.jsonl",
                     "training data: .jsonl/.json/.parquet/.csv file, a saved HF dataset dir, or a hub dataset id; "
                     "several, comma-separated (a.jsonl,b.jsonl), are read one after the other")
    eval: str | None = opt("reward_data/sft/eval.jsonl", "held-out data in the same formats; empty = none. The "
                           "default (the demo's held-out rows) holds for the demo's data only: with your own train "
                           "it is empty unless named")
    split: str = opt("train", "split to read when `train` is a hub dataset id or a DatasetDict directory")
    max_length: int = opt(512, "tokens per example (prompt + answer); SFT cuts longer answers at the end, "
                          "the reward stage rejects pairs whose answers do not fit whole",
                          lambda v: v >= 8, "must be >= 8")
    max_reject_share: float = opt(0.01, "fail when more than this share of rows is rejected (0.01 = 1%)",
                                  lambda v: 0 <= v <= 1, "must be in [0, 1]")
    completion_only: bool = opt(True, "SFT: train only on answer tokens (prompt masked) for chat and "
                                  "prompt/completion rows")
    limit: int | None = opt(None, "use only the first N valid training rows (quick runs); empty = all",
                            lambda v: v is None or v >= 1, "must be >= 1 or empty")
    eval_limit: int | None = opt(None, "use only the first N valid held-out rows; empty = all",
                                 lambda v: v is None or v >= 1, "must be >= 1 or empty")


@dataclass
class TrainingConfig:
    learning_rate: float = opt(2e-4, "peak learning rate", _positive, "must be > 0")
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", _positive, "must be > 0")
    max_steps: int = opt(-1, "optimizer steps; -1 = derive from epochs", lambda v: v == -1 or v >= 1,
                         "must be -1 or >= 1")
    batch_size: int = opt(8, "examples per device per forward pass", _positive, "must be >= 1")
    grad_accum: int = opt(1, "forward passes per optimizer step", _positive, "must be >= 1")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt("cosine", "learning-rate curve")
    warmup_ratio: float = opt(0.05, "share of steps spent warming up", lambda v: 0 <= v < 1, "must be in [0, 1)")
    weight_decay: float = opt(0.0, "AdamW weight decay", lambda v: v >= 0, "must be >= 0")
    max_grad_norm: float = opt(1.0, "gradient-norm clip", _positive, "must be > 0")
    max_bad_steps: int = opt(3, "a step with NaN/inf gradients (or, in PPO, rewards or losses) is skipped; this "
                             "many in a row stop training", _positive, "must be >= 1")
    gradient_checkpointing: bool | None = opt(None, "recompute activations to save memory; empty = on CUDA only")
    padding_free: bool = opt(False, "SFT and DPO: put each batch's sequences end to end in one row, without padding "
                             "(positions restart for each, attention stays within each): the same loss, and no "
                             "compute spent on padding when lengths vary")
    compile: bool = opt(False, "SFT, reward and DPO: compile each decoder layer with torch.compile (fewer, fused "
                        "kernels; the same loss). The first steps wait for compilation (tens of seconds on a GPU, "
                        "about a minute on a CPU, which also needs a C++ compiler); worth it for runs of many steps. "
                        "Dropout inside a compiled layer draws other random numbers than eager code")
    mlp_tiles: int = opt(1, "run each decoder layer's MLP over this many tiles of tokens in training, each tile "
                         "recomputed in the backward pass: the same loss with 1/N of the MLP's wide tensors alive "
                         "(the largest part of a step's peak besides the weights at long sequences), for one more "
                         "MLP forward per layer; 1 = off, 4 is a good start. Not with compile", _positive,
                         "must be >= 1")
    seed: int = opt(42, "seed for data order, LoRA init and dropout")
    logging_steps: int = opt(5, "log metrics every N steps", _positive, "must be >= 1")
    save_steps: int = opt(25, "checkpoint every N steps (resume continues from the newest)", _positive, "must be >= 1")
    save_total_limit: int = opt(2, "checkpoints kept while training", _positive, "must be >= 1")
    eval_steps: int | None = opt(None, "evaluate every N steps; empty = only before and after training",
                                 lambda v: v is None or v >= 1, "must be >= 1 or empty")
    report_to: list[str] = opt([], "trackers for transformers' report_to, e.g. [tensorboard] or [wandb]")


@dataclass
class StageConfig:
    """The parts every stage shares. A stage writes into `<runs_dir>/<run>/<stage>/`."""

    run: str = opt("demo", "run name: the stage writes into <runs_dir>/<run>/<stage>/",
                   lambda v: bool(v) and "/" not in v and v not in {".", ".."}, "must be a non-empty name without '/'")
    runs_dir: str = opt("runs", "directory holding all runs")
    overwrite: bool = opt(False, "replace a finished stage output of the same run (otherwise it is refused)")
    resume: bool = opt(True, "continue an interrupted run from its newest checkpoint")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "optimisation"})

    def __post_init__(self) -> None:
        """The demo's held-out files follow the demo's training data, never a user's own: a stage trained on
        data.train=mine.jsonl is not evaluated on the shipped arithmetic rows unless they are named."""
        shipped = next(f for f in dataclasses.fields(self) if f.name == "data").default_factory()
        own = not reads_file(self.data.train, shipped.train)
        if own and self.data.eval == shipped.eval and shipped.eval is not None:
            self.data = dataclasses.replace(self.data, eval=None)
        prompts = next((f for f in dataclasses.fields(self) if f.name == "eval_prompts"), None)
        if prompts is not None and own and self.eval_prompts == prompts.default:
            self.eval_prompts = self.data.eval  # the user's own held-out rows (their prompts), or none


def reads_file(spec: str | None, name: str) -> bool:
    """Whether a data spec (one file, or several comma-separated) reads the file `name`: the demo's next round
    reads new pairs and the shipped ones together, and is still the demo."""
    return bool(spec) and name in [part.strip() for part in spec.split(",")]


def _sft_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=3e-4)


@dataclass
class SFTConfig(StageConfig):
    stage: typing.ClassVar[str] = "sft"
    training: TrainingConfig = field(default_factory=_sft_training, metadata={"help": "optimisation"})
    samples: int = opt(2, "held-out prompts answered by the base and by base + adapter after training (0 = none)",
                       lambda v: v >= 0, "must be >= 0")


def _pref_data() -> DataConfig:
    return DataConfig(train="reward_data/prefs/train.jsonl", eval="reward_data/prefs/eval.jsonl")


@dataclass
class RewardConfig(StageConfig):
    stage: typing.ClassVar[str] = "reward"
    data: DataConfig = field(default_factory=_pref_data, metadata={"help": "preference data"})
    init_from_sft: str | None = opt(
        None, "SFT stage output (e.g. runs/demo/sft) whose LoRA weights start the reward adapter (its r, alpha and "
        "target modules are used); empty = a fresh adapter on the base")
    margin: float = opt(0.0, "constant margin in the loss -log σ(r_chosen - r_rejected - margin); a row's own "
                        "numeric 'margin' field is added to it", lambda v: v >= 0, "must be >= 0")
    histogram_bins: int = opt(20, "bins of the held-out score histogram in metrics.json", lambda v: v >= 2,
                              "must be >= 2")


def _dpo_lora() -> LoraConfig:
    return LoraConfig(dropout=0.0)


def _dpo_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-5)


@dataclass
class DPOConfig(StageConfig):
    stage: typing.ClassVar[str] = "dpo"
    data: DataConfig = field(default_factory=_pref_data, metadata={"help": "preference data"})
    lora: LoraConfig = field(default_factory=_dpo_lora, metadata={
        "help": "LoRA adapter (from SFT, its r, alpha and target modules are kept)"})
    training: TrainingConfig = field(default_factory=_dpo_training, metadata={"help": "optimisation"})
    init_from_sft: str | None = opt(
        None, "SFT stage output (e.g. runs/demo/sft): the policy starts from its weights and the frozen SFT adapter "
        "is the reference; empty = a fresh adapter, and the base (adapters off) is the reference")
    init_from: str | None = opt(
        None, "a finished policy on the same base (a dpo, ppo, grpo or sft stage output, e.g. the loop's champion) "
        "whose adapter the policy starts from; init_from_sft stays the reference. Empty = start from init_from_sft")
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = opt(
        "sigmoid", "sigmoid = DPO; ipo = IPO (bounded, less overfitting); hinge = SLiC-style margin; "
        "simpo = reference-free, length-normalised (SimPO)")
    beta: float | None = opt(None, "strength of the pull toward the reference (higher = stay closer); for simpo, "
                             "the reward scale. Empty = 0.1 for sigmoid, ipo and hinge, 2.0 for simpo (the SimPO "
                             "paper's β is 2–10; 0.1 leaves its length-normalised rewards almost flat)",
                             lambda v: v is None or v > 0, "must be > 0 or empty")
    label_smoothing: float = opt(0.0, "sigmoid loss only: assumed share of flipped labels (conservative DPO)",
                                 lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    simpo_gamma: float = opt(0.5, "simpo only: target reward margin", lambda v: v >= 0, "must be >= 0")
    sft_weight: float = opt(0.0, "adds this × the chosen answers' mean token NLL to the loss (RPO): keeps chosen "
                            "answers likely when the pair differs in a few tokens", lambda v: v >= 0, "must be >= 0")
    cache_reference: bool = opt(True, "keep the reference log-probs in <runs_dir>/<run>/cache/, keyed by the data's "
                                "and the reference adapter's content hashes, and reuse them")
    eval_prompts: str | None = opt(
        "reward_data/prefs/prompts.jsonl", "held-out prompts answered by the DPO and the reference policy after "
        "training; rows with an integer 'answer' are also judged by the gold judge; empty = no win-rate. The "
        "default (the demo's prompts) holds for the demo's data only: with your own data.train it becomes your "
        "data.eval (its rows' prompts), or none")
    eval_limit: int = opt(64, "how many eval_prompts to answer", _positive, "must be >= 1")
    reward_model: str | None = opt(None, "a reward run (e.g. runs/demo/reward) that also judges the win-rate")
    max_new_tokens: int = opt(64, "longest generated answer in the win-rate evaluation", _positive, "must be >= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"label_smoothing={self.label_smoothing} applies to loss=sigmoid only; loss={self.loss} "
                              "has no smoothed form, so it would be ignored. Set label_smoothing=0 or loss=sigmoid")


@dataclass
class RolloutConfig:
    batch_size: int = opt(16, "prompts answered per step (GRPO: each grpo.num_generations times)", _positive,
                          "must be >= 1")
    temperature: float = opt(1.0, "sampling temperature of rollouts: answers are drawn from softmax(logits / T) "
                             "with nothing else applied (no top-k, no repetition penalty, nothing from the base's "
                             "generation_config.json), and the PPO ratios and KL read log-probs at the same T",
                             _positive, "must be > 0")
    top_p: float = opt(1.0, "nucleus sampling mass; only 1.0 (off) is accepted, since a truncated draw is not the "
                       "distribution the PPO log-probs describe", lambda v: 0 < v <= 1, "must be in (0, 1]")
    max_new_tokens: int = opt(64, "longest answer; a rollout stops at EOS or here", _positive, "must be >= 1")
    missing_eos_penalty: float = opt(1.0, "subtracted from the score of an answer cut off before its EOS",
                                     lambda v: v >= 0, "must be >= 0")


@dataclass
class PPOSection:
    epochs: int = opt(2, "passes of PPO updates over each rollout batch", _positive, "must be >= 1")
    clip_range: float = opt(0.2, "policy ratio clip ε", _positive, "must be > 0")
    value_clip_range: float = opt(0.2, "value clip around the rollout's value estimates", _positive, "must be > 0")
    value_coef: float = opt(0.1, "weight of the value loss; the value model has its own adapter, head and gradient "
                            "clipping, so under AdamW this hardly changes its pace (0 = frozen): value_learning_rate "
                            "does", lambda v: v >= 0, "must be >= 0")
    value_learning_rate: float | None = opt(None, "learning rate of the value adapter and head; empty = "
                                            "training.learning_rate", lambda v: v is None or v > 0,
                                            "must be > 0 or empty")
    gamma: float = opt(1.0, "discount per token", lambda v: 0 < v <= 1, "must be in (0, 1]")
    lam: float = opt(0.95, "GAE λ", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 per rollout batch")
    kl_estimator: Literal["k1", "k3"] = opt("k1", "per-token KL penalty estimator: k1 = log π − log ρ, k3 = "
                                            "(ρ/π − 1) − log(ρ/π) (never negative)")
    kl_coef: float = opt(0.2, "KL penalty coefficient (the start value when target_kl is set)",
                         lambda v: v >= 0, "must be >= 0")
    target_kl: float | None = opt(None, "adapt kl_coef toward this KL per answer (nats); empty = fixed coefficient",
                                  lambda v: v is None or v > 0, "must be > 0 or empty")
    kl_horizon: int = opt(10000, "adaptive KL: answers over which the coefficient can change by ±20%", _positive,
                          "must be >= 1")
    kl_ceiling: float = opt(10.0, "stop the run when the mean KL per answer stays above this ...", _positive,
                            "must be > 0")
    kl_ceiling_steps: int = opt(3, "... for this many steps in a row", _positive, "must be >= 1")
    reward_clip: float | None = opt(10.0, "clip reward-model scores to ±this (after normalising); empty = no clip",
                                    lambda v: v is None or v > 0, "must be > 0 or empty")
    normalize_reward: bool = opt(True, "scale scores by the running std of all scores seen (and centre them)")


@dataclass
class RewardTerm:
    source: str = opt("gold", "gold = the shipped judge of the demo's arithmetic task (0 to 2.75; every prompt row "
                      "needs an integer 'answer'); format = 1 when the answer ends with the shipped task's 'The answer "
                      "is N.' sentence, else 0; reward_model = the reward run named by reward_model=; a directory = "
                      "a reward run or merged reward model; path/to/file.py:fn or module:fn = your function, called "
                      "as fn(prompt, answer, row) with the last user message, the sampled answer and the data row "
                      "(a dict), returning a finite number")
    weight: float = opt(1.0, "this reward's weight in the sum the RL stage maximises",
                        lambda v: v == v and abs(v) != float("inf"), "must be a finite number")


_SOURCES = RewardTerm.__dataclass_fields__["source"].metadata["help"]


def _ppo_data() -> DataConfig:
    return DataConfig(train="reward_data/prefs/train.jsonl", eval=None)


def _ppo_lora() -> LoraConfig:
    return LoraConfig(dropout=0.0)


def _ppo_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-5, max_steps=30, batch_size=8, lr_scheduler="constant", warmup_ratio=0.0,
                          logging_steps=1, save_steps=10)


@dataclass
class PPOConfig(StageConfig):
    stage: typing.ClassVar[str] = "ppo"
    data: DataConfig = field(default_factory=_ppo_data, metadata={
        "help": "prompts: rows with a 'prompt' (string or messages); other fields are ignored"})
    lora: LoraConfig = field(default_factory=_ppo_lora, metadata={"help": "LoRA adapters (policy and value)"})
    training: TrainingConfig = field(default_factory=_ppo_training, metadata={
        "help": "optimisation: max_steps = PPO steps (rollout batches); batch_size = answers per forward pass of an "
                "update; grad_accum = mini-batches per optimizer step"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollouts"})
    ppo: PPOSection = field(default_factory=PPOSection, metadata={"help": "PPO"})
    init_from_sft: str | None = opt(
        None, "SFT stage output: the policy (and value adapter) start from its weights, the frozen SFT adapter is "
        "the reference; empty = fresh adapters, and the base (adapters off) is the reference")
    init_from: str | None = opt(
        None, "a finished policy on the same base (a dpo, ppo, grpo or sft stage output, e.g. the loop's champion) "
        "whose adapter the policy starts from; init_from_sft stays the reference. Empty = start from init_from_sft")
    reward_model: str | None = opt(None, "reward run (e.g. runs/demo/reward) on the same base: its adapter and "
                                   "score head score the rollouts (the 'reward_model' term of rewards)")
    rewards: list[RewardTerm | str] = opt(
        ["reward_model"], "what PPO maximises: a list of rewards, each a source (see below) or {source: S, weight: W}; "
        "summed with their weights, each one's mean logged on its own. E.g. [reward_model, {source: gold, weight: "
        "0.5}] or [gold] (no reward model: the value model then starts fresh). Sources: " + _SOURCES)
    eval_prompts: str | None = opt(
        "reward_data/prefs/prompts.jsonl", "held-out prompts answered by the PPO and the reference policy after "
        "training (gold judge and reward model win-rates); empty = none. The default (the demo's prompts) holds for "
        "the demo's data only: with your own data.train it becomes your data.eval, or none")
    eval_limit: int = opt(64, "how many eval_prompts to answer", _positive, "must be >= 1")
    max_new_tokens: int = opt(64, "longest generated answer in the win-rate evaluation", _positive, "must be >= 1")


@dataclass
class GRPOSection:
    num_generations: int = opt(8, "answers sampled per prompt: the group each answer is compared with",
                               lambda v: v >= 2, "must be >= 2 (an answer needs others to be compared with)")
    advantage: Literal["grpo", "rloo"] = opt(
        "grpo", "grpo = (reward − the group's mean) / the group's std; rloo = reward − the mean of the OTHER answers "
        "to the same prompt (leave-one-out)")
    scale_rewards: bool = opt(True, "grpo: divide by the group's std; false = Dr. GRPO (no std: prompts that are "
                              "nearly always or nearly never solved are not over-weighted)")
    loss_norm: Literal["sequence", "token", "constant"] = opt(
        "token", "how token losses become one number: sequence = mean per answer, then over answers (GRPO); token = "
        "over all tokens of the batch (DAPO); constant = sum / (answers × rollout.max_new_tokens) (Dr. GRPO)")
    clip_low: float = opt(0.2, "the ratio's lower clip ε_low: 1 − ε_low", lambda v: 0 < v < 1, "must be in (0, 1)")
    clip_high: float = opt(0.28, "the ratio's upper clip ε_high: 1 + ε_high; above clip_low = DAPO's clip-higher "
                           "(unlikely good tokens may grow further, which keeps entropy up)", _positive, "must be > 0")
    beta: float = opt(0.04, "weight of the k3 KL to the reference (the frozen SFT adapter) in the loss; 0 = no "
                      "reference at all (its log-probs are not even computed)", lambda v: v >= 0, "must be >= 0")
    epochs: int = opt(1, "passes over each generation batch; each pass takes one optimizer step per "
                      "training.batch_size × training.grad_accum answers, ratios against the sampling-time log-probs",
                      _positive, "must be >= 1")
    skip_uniform_groups: bool = opt(True, "leave out of the update the groups whose answers all scored alike (their "
                                    "advantages are 0: only their KL term would train); they are counted either way")
    kl_ceiling: float = opt(10.0, "stop the run when the mean KL per answer stays above this ...", _positive,
                            "must be > 0")
    kl_ceiling_steps: int = opt(3, "... for this many steps in a row", _positive, "must be >= 1")


def _grpo_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-5, max_steps=30, batch_size=8, lr_scheduler="constant", warmup_ratio=0.0,
                          logging_steps=1, save_steps=10)


def _grpo_rollout() -> RolloutConfig:
    return RolloutConfig(batch_size=4, missing_eos_penalty=0.0)


@dataclass
class GRPOConfig(StageConfig):
    stage: typing.ClassVar[str] = "grpo"
    data: DataConfig = field(default_factory=_ppo_data, metadata={
        "help": "prompts: rows with a 'prompt' (string or messages) and what the rewards read (gold: 'answer')"})
    lora: LoraConfig = field(default_factory=_ppo_lora, metadata={"help": "LoRA adapter of the policy"})
    training: TrainingConfig = field(default_factory=_grpo_training, metadata={
        "help": "optimisation: max_steps = GRPO steps (generation batches); batch_size = answers per forward pass of "
                "an update; grad_accum = forward passes per optimizer step"})
    rollout: RolloutConfig = field(default_factory=_grpo_rollout, metadata={"help": "sampling"})
    grpo: GRPOSection = field(default_factory=GRPOSection, metadata={"help": "GRPO / RLOO"})
    init_from_sft: str | None = opt(
        None, "SFT stage output: the policy starts from its weights, the frozen SFT adapter is the reference; empty = "
        "a fresh adapter, and the base (adapters off) is the reference")
    init_from: str | None = opt(
        None, "a finished policy on the same base (a dpo, ppo, grpo or sft stage output, e.g. the loop's champion) "
        "whose adapter the policy starts from; init_from_sft stays the reference. Empty = start from init_from_sft")
    reward_model: str | None = opt(None, "reward run (e.g. runs/demo/reward) for a 'reward_model' term in rewards")
    rewards: list[RewardTerm | str] = opt(
        ["gold"], "what GRPO maximises: a list of rewards, each a source or {source: S, weight: W}, summed with their "
        "weights, each one's mean logged on its own. Sources: " + _SOURCES)
    eval_prompts: str | None = opt(
        "reward_data/prefs/prompts.jsonl", "held-out prompts answered by the GRPO and the reference policy after "
        "training (gold judge and reward model win-rates); empty = none. The default (the demo's prompts) holds for "
        "the demo's data only: with your own data.train it becomes your data.eval, or none")
    eval_limit: int = opt(64, "how many eval_prompts to answer", _positive, "must be >= 1")
    max_new_tokens: int = opt(64, "longest generated answer in the win-rate evaluation", _positive, "must be >= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grpo.clip_high < self.grpo.clip_low:
            raise ConfigError(f"grpo.clip_high={self.grpo.clip_high} is below grpo.clip_low={self.grpo.clip_low}; "
                              "clip-higher means clip_high >= clip_low (equal = PPO's symmetric clip)")


STAGES: dict[str, type[StageConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
                                        "ppo": PPOConfig, "grpo": GRPOConfig}


# ---------------------------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Any:
    """YAML file (optional) + dotted overrides -> a validated config of type `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item, cls)
    return build(cls, raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str, cls: type) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. training.learning_rate=1e-4)")
    _check_key_path(cls, key)
    value = yaml.safe_load(text) if text.strip() else None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = _hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys.extend(all_keys(sub, key + "."))
    return keys


def _check_key_path(cls: type, key: str) -> None:
    if key not in all_keys(cls):
        raise ConfigError(f"unknown config key '{key}'{_nearest(key, all_keys(cls))}")


def _nearest(key: str, candidates: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a right name in the wrong section: match on the last part
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, raw: Any, prefix: str = "", base: Any = None) -> Any:
    """Check a nested mapping against `cls` and build the dataclass; errors name the dotted key. Keys not given
    keep `base`'s values (a stage's own section defaults) or the class defaults."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys, got {type(raw).__name__}: {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = prefix + str(key)
            raise ConfigError(f"unknown config key '{full}'{_nearest(full, all_keys(cls, prefix))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):  # a section: start from this stage's defaults for it
            section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            value = build(hints[f.name], {} if raw[f.name] is None else raw[f.name], key + ".", section)
        else:
            value = _convert(key, raw[f.name], hints[f.name])
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"config key '{key}' = {value!r}: {f.metadata['why']}")
        values[f.name] = value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _convert(key: str, value: Any, tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            if dataclasses.is_dataclass(option) and isinstance(value, dict):  # a mapping is meant as that section
                return build(option, value, key + ".")
            try:
                return _convert(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}' = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"config key '{key}' = {value!r}: must be one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected {_type_name(tp)}")
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    return _scalar(key, value, tp)


def _scalar(key: str, value: Any, tp: Any) -> Any:
    bad = ConfigError(f"config key '{key}' = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _type_name(item))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# ---------------------------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One help line per key: `key = default  (type) help` — shown by `align <stage> --help`."""
    lines = []
    defaults = cls() if defaults is None else defaults  # a stage may default a section differently
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix + f.name + ".", getattr(defaults, f.name)))
            continue
        default = getattr(defaults, f.name)
        shown = "" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
        shown = shown.removesuffix("\n...")
        lines.append(f"  {prefix + f.name} = {shown}\n      {_type_name(tp)}; {f.metadata.get('help', '')}")
    return lines
