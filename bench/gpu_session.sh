#!/usr/bin/env bash
# The GPU measurements issue 9 still needs, as ONE call of the lent machine (about 9.5 minutes of its time).
#
# Here first (the machine has no network): the wheels it lacks, into .whl/ (ignored by git, ~60 MB with the tree),
#   pip download --no-deps -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#       bitsandbytes==0.50.2 "transformers==$(pip show transformers | sed -n 's/Version: //p')" peft==0.21.2
#   python bench/ppo_step.py --shape tiny        # exports the tokenizer to bench/work/tokenizer
# then: run(command="bash bench/gpu_session.sh", carry=[".whl", "bench/work/tokenizer"], timeout_s=600).
# Each compare.py run holds its own baseline (ratios are only ever taken within one run); --deadline makes every
# run stop starting new (stage, shape) pairs in time, and results are rewritten after each pair, so a cut-off
# call still brings back what finished.
# PARTS picks the parts (default "1 2 3 4", ~9.5 minutes); part 5 (training.mlp_tiles, ~3.5 minutes) fits a second
# call if the machine is still warm: run(command="PARTS=5 bash bench/gpu_session.sh", ...).
# A dry run of the plumbing on a CPU, tiny model, nothing installed:  SMALL=tiny BIG=tiny OUT=/tmp/gs bash THIS
set -uo pipefail
cd "$(dirname "$0")/.."
small=${SMALL:-qwen2.5-0.5b,qwen2.5-1.5b} first=${SMALL:-qwen2.5-0.5b} big=${BIG:-qwen2.5-7b}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:. TQDM_DISABLE=1
out=${OUT:-bench/results}
common=(--work /tmp/bw --tokenizer bench/work/tokenizer --out "$out" --steps 6 --warmup 3)
parts=" ${PARTS:-1 2 3 4} "
want() { [[ $parts == *" $1 "* ]]; }
mkdir -p "$out"
(nvidia-smi --query-gpu=name,memory.total --format=csv || echo no GPU) | tee "$out/gpu_session_device.txt"
# 1. align as it is now (no fp32 copies of embeddings, chunked DPO answer log-probs) against plain TRL
want 1 && timeout 190 python3 bench/compare.py --shapes "$small" --stages sft,reward,dpo --deadline 140 \
    --tag _now "${common[@]}"
# 2. what is alive at the peak of each side at 0.5B (eager; the meter slows the steps, so 1 step each): what a
#    memory change has to attack, on the GPU itself
want 2 && timeout 60 python3 bench/compare.py --shapes "$first" --stages sft,reward,dpo --deadline 40 --steps 1 \
    --warmup 1 --at-peak --tag _at_peak --work /tmp/bw --tokenizer bench/work/tokenizer --out "$out"
# 3. the same as 1 with each decoder layer compiled (its first steps compile: 3 warm-up steps are left out)
want 3 && timeout 160 python3 bench/compare.py --shapes "$small" --stages sft,dpo --deadline 110 \
    --align-overrides 'training.compile=true' --tag _compile "${common[@]}"
# 4. 7B shape: memory must not exceed the baseline's; PPO step within 16 GB
want 4 && timeout 120 python3 bench/compare.py --shapes "$big" --stages sft,dpo --deadline 80 --tag _7b "${common[@]}"
want 4 && timeout 50 python3 bench/ppo_step.py --shape "$big" --steps 2 --work /tmp/bw --tokenizer bench/work/tokenizer \
    --out "$out"
# 5. training.mlp_tiles=4 (MLPs over 4 tiles of tokens): memory and its price in tokens/s, 0.5B and 7B
want 5 && timeout 210 python3 bench/compare.py --shapes "$first,$big" --stages reward,dpo --deadline 150 \
    --align-overrides 'training.mlp_tiles=4' --tag _mlp_tiles "${common[@]}"
ls -l "$out"
