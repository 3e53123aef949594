"""What `align run` is configured by: the pipeline's own keys (data, evaluation, promotion, merge) and the order
of its steps. Kept apart from the pipeline's machinery, which loads torch and the stages, so that `align --help`
and `align run --help` can describe every key without loading a model library."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from align.evaluation.promotion import PromotionRule
from align.runtime.config import ModelConfig, opt, reads_file
from align.runtime.errors import ConfigError

STAGE_ORDER = ("sft", "reward", "dpo", "ppo", "grpo")
STEPS = (*STAGE_ORDER, "evaluate", "merge")
POLICIES = ("dpo", "ppo", "grpo")
# what each stage starts from (its key includes theirs, so a changed SFT retrains everything after it)
# (PPO and GRPO start from the reward model only when their rewards name it: see uses_reward_model)
PARENTS = {"sft": (), "reward": ("sft",), "dpo": ("sft",), "ppo": ("sft", "reward"), "grpo": ("sft", "reward")}


@dataclass
class PipelineData:
    sft: str = opt("reward_data/sft/train.jsonl", "SFT examples (chat, prompt/completion or text rows)")
    sft_eval: str | None = opt("reward_data/sft/eval.jsonl", "held-out SFT examples: SFT's eval loss, and perplexity "
                               "and BLEU/ROUGE-L in the evaluation; empty = none")
    preferences: str = opt("reward_data/prefs/train.jsonl", "preference pairs for the reward model and DPO (and "
                           "PPO's prompts); several files comma-separated, e.g. old.jsonl,new.jsonl")
    preferences_eval: str | None = opt("reward_data/prefs/eval.jsonl", "held-out pairs: reward-model accuracy and "
                                       "calibration, DPO's eval loss; empty = none")
    prompts: str | None = opt(None, "PPO's and GRPO's training prompts; empty = the prompts of `preferences`")
    eval_prompts: str = opt("reward_data/prefs/prompts.jsonl", "held-out prompts the evaluation answers; rows with "
                            "an integer 'answer' are also judged by the gold judge. The shipped held-out defaults "
                            "(sft_eval, preferences_eval, eval_prompts) are the demo's: with your own sft or "
                            "preferences (not reading the shipped files) they are empty unless named, and "
                            "eval_prompts becomes the prompts of your preferences_eval")

    def __post_init__(self) -> None:
        default = {f.name: f.default for f in dataclasses.fields(self)}
        if not reads_file(self.sft, default["sft"]) and self.sft_eval == default["sft_eval"]:
            self.sft_eval = None
        if reads_file(self.preferences, default["preferences"]):
            return
        if self.preferences_eval == default["preferences_eval"]:
            self.preferences_eval = None
        if self.eval_prompts == default["eval_prompts"]:
            if not self.preferences_eval:
                raise ConfigError("data.preferences is your own data and has no held-out part, so there is nothing "
                                  "to evaluate the new policies on: name data.preferences_eval (held-out pairs; "
                                  "their prompts are answered) or data.eval_prompts (prompts, optionally with an "
                                  "integer 'answer' for the gold judge)")
            self.eval_prompts = self.preferences_eval


@dataclass
class EvalSection:
    limit: int = opt(64, "held-out prompts (and SFT rows) used by the evaluation", lambda v: v >= 1, "must be >= 1")
    max_new_tokens: int = opt(64, "longest answer generated in the evaluation", lambda v: v >= 1, "must be >= 1")
    reward_judge: bool = opt(True, "judge with the reward model as well when the gold judge decides (a second "
                             "opinion: where the two disagree a policy may be gaming the reward model); false "
                             "saves a forward pass per answer. Where prompts carry no gold answers, or "
                             "promotion.judge is reward_model, the reward model judges either way")
    kl_limit: int | None = opt(None, "the first N of those prompts estimate each policy's KL (one sampled answer "
                               "and two log-prob passes each: the dearest part of an evaluation on a CPU); "
                               "empty = all", lambda v: v is None or v >= 1, "must be >= 1 or empty")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N")


@dataclass
class MergeSection:
    enabled: bool = opt(True, "merge a newly promoted champion into a plain model directory (vN/merged)")
    dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of the merged weights")


@dataclass
class PairsSection:
    enabled: bool = opt(False, "open each new round by sampling the champion: for prompts no earlier round used, its "
                        "best and worst of `n` answers (by the gold judge) become preference pairs, read before "
                        "data.preferences by the reward model and DPO (and PPO's and GRPO's prompts), so one "
                        "`align run` is one round. Needs a champion (a first run makes one)")
    prompts: str | None = opt(None, "prompts to draw from, each with an integer 'answer' for the gold judge; empty = "
                              "data.prompts, else the prompts of data.preferences")
    limit: int = opt(96, "new prompts per round", lambda v: v >= 1, "must be >= 1")
    n: int = opt(4, "answers sampled per prompt", lambda v: v >= 2, "must be >= 2 (a pair needs two)")
    temperature: float = opt(1.0, "sampling temperature (the champion's own distribution at 1.0)", lambda v: v > 0,
                             "must be > 0")
    max_new_tokens: int = opt(64, "longest sampled answer", lambda v: v >= 1, "must be >= 1")


@dataclass
class PipelineSettings:
    name: str = opt("demo", "pipeline name: versions go to <runs_dir>/<name>/v1, v2, ...",
                    lambda v: bool(v) and "/" not in v and v not in {".", ".."}, "must be a name without '/'")
    runs_dir: str = opt("runs", "directory holding all runs")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the base model of every stage"})
    start_from: Literal["champion", "sft"] = opt(
        "champion", "where a new version's DPO, PPO and GRPO start: champion = the champion policy's weights (when "
        "it is a dpo, ppo or grpo policy), so rounds build on each other; sft = the SFT adapter every round")
    reference: Literal["sft", "champion"] = opt(
        "sft", "what those policies are held to (KL penalty, DPO's implicit reward) when they start from the "
        "champion: sft = the SFT adapter, a fixed anchor that bounds how far a lineage drifts in all; champion = the "
        "policy they start from, a moving anchor that lets every round move as far again (the lineage's distance "
        "from SFT then adds up round by round)")
    data: PipelineData = field(default_factory=PipelineData, metadata={"help": "data of every stage"})
    pairs: PairsSection = field(default_factory=PairsSection, metadata={"help": "on-policy pairs that open a round"})
    evaluate: EvalSection = field(default_factory=EvalSection, metadata={"help": "evaluation of new policies"})
    promotion: PromotionRule = field(default_factory=PromotionRule, metadata={"help": "when a policy is promoted"})
    merge: MergeSection = field(default_factory=MergeSection, metadata={"help": "merging the new champion"})
