"""SFT recipe: teach the base model the answers in the SFT data with a LoRA adapter.

    python recipes/sft.py                                   # recipes/configs/sft.yaml, embedded SmolLM2
    python recipes/sft.py training.learning_rate=1e-4 run=exp1
    python recipes/sft.py --config my.yaml model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct

Same as `align sft --config recipes/configs/sft.yaml ...`. The stage itself is align/stages/sft.py; this script only
picks the config that sits next to it. Output: runs/<run>/sft/ (PEFT adapter, tokenizer, config, metrics,
manifest). Run it again after an interruption and it resumes from the newest checkpoint.
"""

import sys

from align.cli.main import recipe

if __name__ == "__main__":
    sys.exit(recipe("sft", __file__))
