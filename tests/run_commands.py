"""Run several align commands one after another in this process: `python run_commands.py JOBS.json`, or under
`accelerate launch ... run_commands.py JOBS.json`, where every process runs every job (as it would run each
command launched on its own), so one launch — one start-up of the processes and their process group — serves
several multi-process checks (tests/test_multiprocess.py).

JOBS.json is a list of {"name": ..., "argv": [...]} (the arguments of `align ...`), or {"name": ..., "script":
"recipes/X.py", "argv": [...]} (the script run as `python recipes/X.py ...` runs it). The main process prints
`=== NAME` before each job, so the output can be read job by job; the first job that fails ends the run with its
exit status.
"""

import json
import os
import runpy
import sys


def run(job: dict) -> int:
    if "script" not in job:
        from align.cli.main import main

        return main(job["argv"])
    sys.argv = [job["script"], *job["argv"]]
    try:
        runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as e:
        return e.code or 0
    return 0


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        if os.environ.get("RANK", "0") == "0":
            print(f"=== {job['name']}", flush=True)
        code = run(job)
        sys.stdout.flush()
        if code:
            sys.exit(code)
