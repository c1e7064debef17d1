"""Cold start of `t2vu plugins list` (goal: under 0.5 s on the 2-core dev machine).

Runs the console script in fresh processes, prints a table and writes
benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["plugins", "list"], ["plugins", "list", "--json"], ["--help"], ["spec", "schema"]]
GOAL_S = 0.5


def main(repeats: int = 7) -> int:
    exe = shutil.which("t2vu") or str(Path(sys.executable).with_name("t2vu"))
    rows = []
    for args in COMMANDS:
        subprocess.run([exe, *args], capture_output=True, check=True)  # warm the file cache
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([exe, *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        rows.append({"command": "t2vu " + " ".join(args), "median_s": statistics.median(times),
                     "min_s": min(times), "max_s": max(times), "repeats": repeats})
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'max s':>7}")
    for r in rows:
        print(f"{r['command']:32} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f}")
    ok = rows[0]["median_s"] < GOAL_S
    print(f"goal: `t2vu plugins list` under {GOAL_S} s -> {'met' if ok else 'NOT met'}")
    out = Path(__file__).with_name("results") / "cli_startup.json"
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "goal_s": GOAL_S, "goal_met": ok, "results": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
