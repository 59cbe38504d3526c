"""How `rlhf demo` fares on a busy machine: wall time quiet and beside CPU-burning processes, at
each thread count.

Each condition runs the whole demo from a cold model cache (pretraining included) in a fresh
folder, so conditions are comparable. A burner is a Python process spinning on one core; they
start before the demo and stop after it. Conditions run one after another, in the order given.

    python benchmarks/busy_machine.py                       # the default grid (about an hour)
    python benchmarks/busy_machine.py --burners 2 --threads 1,2 --limit 900
    python benchmarks/busy_machine.py --quick               # demo --quick, to try the script

`--threads auto` leaves the choice to rlhf (the default when no --threads is given); a number is
passed as `rlhf demo --threads N`. A run longer than --limit seconds is stopped and reported as
"> limit". Results go to --out as JSON lines, one per condition, and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def burn() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_demo(threads: str, burners: int, quick: bool, limit: float) -> dict:
    procs = [burn() for _ in range(burners)]
    try:
        time.sleep(2 if burners else 0)  # let the load average and the scheduler see them
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "rlhf", "demo", "--out", f"{tmp}/demo",
                   "--cache-dir", f"{tmp}/cache"]  # fmt: skip
            if quick:
                cmd.append("--quick")
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            if threads != "auto":
                env["OMP_NUM_THREADS"] = threads  # torch reads it at import for its intra-op pool
            start = time.perf_counter()
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
                seconds, finished = time.perf_counter() - start, done.returncode == 0
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            except subprocess.TimeoutExpired:
                seconds, finished, tail = time.perf_counter() - start, False, ["stopped at --limit"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {
        "threads": threads, "burners": burners, "quick": quick, "seconds": round(seconds, 1),
        "finished": finished, "tail": tail, "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burners", default="0,2", help="comma-separated burner counts")
    parser.add_argument("--threads", default="2,1,auto", help="comma-separated: N or auto")
    parser.add_argument("--quick", action="store_true", help="rlhf demo --quick")
    parser.add_argument("--limit", type=float, default=1500, help="seconds before a run is stopped")
    parser.add_argument("--out", default="benchmarks/results/busy_machine.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for burners in [int(b) for b in args.burners.split(",")]:
        for threads in args.threads.split(","):
            row = run_demo(threads, burners, args.quick, args.limit)
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shown = f"{row['seconds']:.0f} s" if row["finished"] else f"> {row['seconds']:.0f} s"
            print(f"burners {burners}  threads {threads:>4}  {shown}", flush=True)
    quiet = {r["threads"]: r["seconds"] for r in rows if r["burners"] == 0 and r["finished"]}
    base = quiet.get("auto") or quiet.get("2")
    if base:
        print(
            f"\nratio to the quiet {'auto' if 'auto' in quiet else '2-thread'} run ({base:.0f} s):"
        )
        for r in rows:
            mark = "" if r["finished"] else "> "
            print(
                f"  burners {r['burners']}  threads {r['threads']:>4}  {mark}{r['seconds'] / base:.2f}x"
            )


if __name__ == "__main__":
    main()
