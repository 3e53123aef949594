"""PPO recipe: the policy adapter learns to raise the reward model's score, held near the SFT policy by a KL
penalty; policy, reference, reward model and value model are adapters on one base.

    python recipes/ppo.py                                   # recipes/configs/ppo.yaml: runs/demo/sft + reward
    python recipes/ppo.py training.max_steps=100 ppo.target_kl=2.0 run=ppo-long

Same as `align ppo --config recipes/configs/ppo.yaml ...`; the stage itself is align/stages/ppo.py. Output:
runs/<run>/ppo/ (the policy's PEFT adapter at the top, the value adapter and head in value/, tokenizer, config,
metrics with every step's reward, KL, entropy, clip fraction and timings, the win-rate against the SFT policy,
manifest). Interrupted runs resume from runs/<run>/ppo.work/checkpoint-*.
"""

import sys

from align.cli.main import recipe

if __name__ == "__main__":
    sys.exit(recipe("ppo", __file__))
