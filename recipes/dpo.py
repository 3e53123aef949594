"""DPO recipe: the policy adapter learns the preference pairs directly, the frozen SFT adapter as reference.

    python recipes/dpo.py                                     # recipes/configs/dpo.yaml, from runs/demo/sft
    python recipes/dpo.py loss=ipo beta=0.5 run=ipo
    python recipes/dpo.py reward_model=runs/demo/reward       # also judge the win-rate with the reward model

Same as `align dpo --config recipes/configs/dpo.yaml ...`; the stage itself is align/stages/dpo.py. Output:
runs/<run>/dpo/ (the policy's PEFT adapter, tokenizer, config, metrics incl. the win-rate against the SFT
policy on held-out prompts, manifest). Reference log-probs are cached in runs/<run>/cache/.
"""

import sys

from align.cli.main import recipe

if __name__ == "__main__":
    sys.exit(recipe("dpo", __file__))
