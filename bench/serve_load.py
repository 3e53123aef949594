"""Load on `align serve-rm`: requests/s, items/s and latency at 1, 8, 64 and 256 concurrent clients, next to
`align score`'s own path (`RewardModel.score`, in this process) on the same rows.

    python bench/serve_load.py                                   # the demo's reward model, if one is under runs/
    python bench/serve_load.py --run runs/demo/v1/reward --levels 1,8,64,256 --out bench/results/x.txt
    python bench/serve_load.py --server-args "--max-wait-ms 5 --queue-size 2048"

The server is the real command (`python -m align.cli serve-rm`) in its own process on a loopback port; the
clients are threads here, each opening a connection per request (as a scattered PPO/GRPO job or evaluation
worker would). Each level sends max(--requests, clients) requests of --sizes items drawn from a fixed pool of
the demo's preference rows (answers and pairs), so every level has one request per client at least; a level's
requests are the first ones of a larger level's, and the score path scores the 64-request set. Scores the
server returns are checked against `RewardModel.score` over the same items; a mismatch is reported, not hidden.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_demo_rm() -> Path | None:
    """The newest demo reward run: runs/demo/vN/reward (pipeline) or runs/demo/reward (single stage)."""
    found = sorted((ROOT / "runs" / "demo").glob("v*/reward/adapter_config.json"),
                   key=lambda p: int(p.parent.parent.name[1:]) if p.parent.parent.name[1:].isdigit() else -1)
    if found:
        return found[-1].parent
    single = ROOT / "runs" / "demo" / "reward"
    return single if (single / "adapter_config.json").is_file() else None


def item_pool(n: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "reward_data/prefs/train.jsonl").read_text().splitlines()[:4 * n]]
    rng = random.Random(seed)
    pool = []
    for r in rng.sample(rows, n):
        kind = rng.random()
        if kind < 0.25:
            pool.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        else:
            pool.append({"prompt": r["prompt"], "response": r["chosen" if kind < 0.6 else "rejected"]})
    return pool


def make_requests(pool: list[dict], count: int, sizes: tuple[int, int], seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(rng.randint(*sizes))] for _ in range(count)]


def post(port: int, items: list[dict], timeout: float) -> tuple[int, dict | None, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/score", json.dumps({"items": items}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return resp.status, body, time.perf_counter() - start
    except (OSError, http.client.HTTPException):
        return -1, None, time.perf_counter() - start  # refused / reset / timed out: counted as failed
    finally:
        conn.close()


def run_level(port: int, requests: list[list[dict]], clients: int, timeout: float) -> dict:
    results: list[tuple[int, dict | None, float] | None] = [None] * len(requests)
    next_i = iter(range(len(requests)))
    take = threading.Lock()

    def client():
        while True:
            with take:
                i = next(next_i, None)
            if i is None:
                return
            results[i] = post(port, requests[i], timeout)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [(i, r) for i, r in enumerate(results) if r[0] == 200]
    lat = sorted(r[2] for _, r in ok)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {"clients": clients, "sent": len(requests), "answered": len(ok), "statuses": statuses, "wall_s": wall,
            "req_s": len(ok) / wall, "items_s": sum(len(requests[i]) for i, _ in ok) / wall,
            "p50_s": statistics.median(lat) if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "answers": [(requests[i], r[1]["scores"]) for i, r in ok]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rm", "--model", str(run), "--port", str(port),
                             "--device", "cpu", *extra], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def key(item: dict) -> str:
    return json.dumps(item, sort_keys=True)


def score_path(run: Path, rows: list[dict], batch_size: int) -> tuple[float, dict[str, object]]:
    """`align score`'s path on these rows in this process: seconds for the scoring, and each item's result."""
    from align.serving.score import encode_rows, fill_scores, load_reward_model

    rm = load_reward_model(run, "cpu")
    start = time.perf_counter()
    results, slots, seqs = encode_rows(rm, list(enumerate(rows)))
    fill_scores(results, slots, rm.score(seqs, batch_size))
    seconds = time.perf_counter() - start
    out = {}
    for item, r in zip(rows, results):
        out[key(item)] = r.get("score", r.get("margin"))
    return seconds, out


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="reward run dir (default: the demo's, under runs/demo)")
    ap.add_argument("--levels", default="1,8,64,256", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    ap.add_argument("--sizes", default="1-8", help="items per request, min-max")
    ap.add_argument("--pool", type=int, default=48, help="distinct rows the requests draw from")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size of the score path (the server's default)")
    ap.add_argument("--server-args", default="", help="extra `align serve-rm` flags")
    ap.add_argument("--timeout", type=float, default=600, help="client timeout per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    run = args.run or find_demo_rm()
    if run is None:
        raise SystemExit("no demo reward model under runs/demo: run the demo first or pass --run DIR")
    lo, hi = (int(x) for x in args.sizes.split("-"))
    pool = item_pool(args.pool, args.seed)
    levels = [int(x) for x in args.levels.split(",")]
    lines = [f"# serve_load  {time.strftime('%Y-%m-%d %H:%M:%S')}  reward model: {run}",
             f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  cpus: {os.cpu_count()}",
             f"# server args: {args.server_args or '(defaults)'}  items/request {lo}-{hi}  pool {args.pool}"]
    print("\n".join(lines), flush=True)
    proc, port = start_server(run, args.server_args.split(), Path("/tmp") / f"serve_load_{port_tag()}.log")
    level_results = []
    try:
        post(port, pool[:2], args.timeout)  # warm-up: the first pass pays one-off costs
        for clients in levels:
            # the same seed at every level: a level's requests are the first of the next one's, so levels differ
            # in concurrency, not in rows
            reqs = make_requests(pool, max(args.requests, clients), (lo, hi), args.seed)
            res = run_level(port, reqs, clients, args.timeout)
            level_results.append(res)
            print(f"  level {clients}: {res['answered']}/{res['sent']} answered in {res['wall_s']:.1f} s "
                  f"{res['statuses']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows = [it for req in make_requests(pool, max(args.requests, 64), (lo, hi), args.seed) for it in req]
    seconds, expected = score_path(run, rows, args.batch_size)
    lines += [f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", "",
              "| path | clients | answered / sent | status counts | req/s | items/s | p50 s | p99 s |",
              "|---|---|---|---|---|---|---|---|"]
    worst, checked = 0.0, 0
    for res in level_results:
        lines.append(f"| serve-rm | {res['clients']} | {res['answered']} / {res['sent']} | "
                     f"{' '.join(f'{k}:{v}' for k, v in sorted(res['statuses'].items()))} | {res['req_s']:.2f} | "
                     f"{res['items_s']:.2f} | {fmt(res['p50_s'])} | {fmt(res['p99_s'])} |")
        for items, scores in res["answers"]:
            for item, s in zip(items, scores):
                want = expected.get(key(item))
                if want is not None:
                    got = s["margin"] if isinstance(s, dict) else s
                    worst, checked = max(worst, abs(got - want)), checked + 1
    n_req = max(args.requests, 64)
    lines.append(f"| align score (RewardModel.score, batch {args.batch_size}) | - | {n_req} requests as "
                 f"{len(rows)} rows | - | {n_req / seconds:.2f} | {len(rows) / seconds:.2f} | - | - |")
    lines += ["", f"server scores vs the score path: {checked} items compared, max |diff| {worst:.2e}"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def port_tag() -> str:
    return str(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
