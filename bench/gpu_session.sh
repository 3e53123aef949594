#!/usr/bin/env bash
# The GPU measurements issue 9 still needs, as ONE call of the lent machine (about 9 minutes of its time).
#
# Here first (the machine has no network): the wheels it lacks, into .whl/ (ignored by git, ~60 MB with the tree),
#   pip download --no-deps -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#       bitsandbytes==0.50.2 "transformers==$(pip show transformers | sed -n 's/Version: //p')" peft==0.21.2
#   python bench/ppo_step.py --shape tiny        # exports the tokenizer to bench/work/tokenizer
# then: run(command="bash bench/gpu_session.sh", carry=[".whl", "bench/work/tokenizer"], timeout_s=600).
# Each compare.py run holds its own baseline (ratios are only ever taken within one run); --deadline makes every
# run stop starting new (stage, shape) pairs in time, and results are rewritten after each pair, so a cut-off
# call still brings back what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. TQDM_DISABLE=1
out=${OUT:-bench/results}
common=(--work /tmp/bw --tokenizer bench/work/tokenizer --out "$out" --steps 6 --warmup 3)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu_session_device.txt"
# 1. align as it is now (no fp32 copies of embeddings, chunked DPO answer log-probs) against plain TRL
timeout 200 python3 bench/compare.py --shapes qwen2.5-0.5b,qwen2.5-1.5b --stages sft,reward,dpo --deadline 150 \
    --tag _now "${common[@]}"
# 2. the same with each decoder layer compiled (its first steps compile: 3 warm-up steps are left out)
timeout 170 python3 bench/compare.py --shapes qwen2.5-0.5b,qwen2.5-1.5b --stages sft,dpo --deadline 120 \
    --align-overrides 'training.compile=true' --tag _compile "${common[@]}"
# 3. 7B shape: memory must not exceed the baseline's; PPO step within 16 GB
timeout 130 python3 bench/compare.py --shapes qwen2.5-7b --stages sft,dpo --deadline 90 --tag _7b "${common[@]}"
timeout 60 python3 bench/ppo_step.py --shape qwen2.5-7b --steps 2 --work /tmp/bw --tokenizer bench/work/tokenizer \
    --out "$out"
ls -l "$out"
