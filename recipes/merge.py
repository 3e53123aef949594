"""Merge recipe: a stage's adapter merged into its base model, verified, written as a plain HF directory.

    python recipes/merge.py --adapter runs/demo/dpo --out merged/demo-dpo
    python recipes/merge.py --adapter runs/demo/reward --out merged/demo-rm --dtype bf16

Same as `align merge ...`; the logic is align/serving/merge.py.
"""

import sys

from align.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
