"""Reward-model recipe: a LoRA adapter + score head learns which of two answers the preference data prefers.

    python recipes/reward.py                                # recipes/configs/reward.yaml, starts from runs/demo/sft
    python recipes/reward.py init_from_sft= run=rm-fresh    # a fresh adapter, no SFT stage needed
    python recipes/reward.py --config my.yaml data.train=my_pairs.jsonl

Same as `align reward --config recipes/configs/reward.yaml ...`; the stage itself is align/stages/reward.py. Output:
runs/<run>/reward/ (PEFT adapter with the score head, tokenizer, config, metrics incl. held-out accuracy,
calibration and a score histogram, manifest). Score text with it: `align score --model runs/demo/reward ...`.
"""

import sys

from align.cli.main import recipe

if __name__ == "__main__":
    sys.exit(recipe("reward", __file__))
