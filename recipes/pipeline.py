"""The whole loop: SFT → reward model → DPO and PPO → evaluation → promotion → merge → report.

    python recipes/pipeline.py                              # recipes/configs/pipeline.yaml, embedded SmolLM2
    python recipes/pipeline.py dpo.beta=0.5 --from dpo      # change DPO, train it (and what follows) again
    python recipes/pipeline.py data.preferences=reward_data/prefs/train.jsonl,new-pairs.jsonl

Same as `align run recipes/configs/pipeline.yaml ...`. The loop itself is align/loop/pipeline.py. Output: versions
runs/<name>/v1, v2, ... each with report.md; `align runs` lists them, `align runs show vN` shows one's lineage.
"""

import sys
from pathlib import Path

from align.cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "=" in args[0] or args[0].startswith("-"):
        args = [str(Path(__file__).resolve().parent / "configs" / "pipeline.yaml"), *args]
    sys.exit(main(["run", *args]))
