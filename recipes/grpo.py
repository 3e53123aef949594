"""GRPO recipe: the policy adapter learns from rewards you compute — by default the shipped gold judge of the
arithmetic task — comparing several sampled answers per prompt, with no value model and no reward model needed.

    python recipes/grpo.py                                  # recipes/configs/grpo.yaml: from runs/demo/sft
    python recipes/grpo.py grpo.advantage=rloo run=rloo     # leave-one-out baselines instead
    python recipes/grpo.py "rewards=[gold, {source: my_rewards.py:brevity, weight: 0.2}]"

Same as `align grpo --config recipes/configs/grpo.yaml ...`; the stage itself is align/stages/grpo.py. Output:
runs/<run>/grpo/ (the policy's PEFT adapter, tokenizer, config, metrics with every step's rewards per function,
group statistics, KL, entropy, clip fractions and timings, the win-rate against the SFT policy, manifest).
Interrupted runs resume from runs/<run>/grpo.work/checkpoint-*.
"""

import sys

from align.cli.main import recipe

if __name__ == "__main__":
    sys.exit(recipe("grpo", __file__))
