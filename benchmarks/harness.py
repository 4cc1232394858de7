"""Shared benchmark harness: timing, peak-memory subprocesses, tables and JSON.

Timing runs ours and the peer in the same process with the same torch thread count, after a
warm-up, and reports the median of the repeats. Peak memory is measured, never computed: each case
is re-run once in a fresh subprocess that resets the kernel's peak-RSS mark (VmHWM) just before
the call and reports how far the peak rose above the RSS at that moment.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Callable, Optional

import torch


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (peak RSS since start or the last reset); ru_maxrss where /proc is unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_peak_in_subprocess(module: str, case: dict, timeout: float = 1800) -> Optional[float]:
    """Run ``python -m module --memory-case JSON`` and return the peak RSS rise in MiB."""
    cmd = [sys.executable, "-m", module, "--memory-case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def report_peak(run: Callable[[], object]) -> None:
    """Inside the memory subprocess: run once and print the peak RSS rise as JSON."""
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs); peak memory would be wrong")
    before = current_rss_bytes()
    run()
    rise = max(0, peak_rss_bytes() - before)
    print(json.dumps({"peak_mib": rise / 2**20}))


def machine() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as a Markdown table; ``columns`` are (key, header) pairs."""
    print(f"\n{title}  ({date.today().isoformat()}, {machine()})\n")
    print("| " + " | ".join(h for _, h in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        cells = []
        for key, _ in columns:
            val = r.get(key)
            if isinstance(val, float):
                cells.append(f"{val:.3g}" if key != "ratio" else f"{val:.2f}")
            else:
                cells.append("-" if val is None else str(val))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def write_json(path: str, name: str, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "date": date.today().isoformat(), "machine": machine(), "rows": rows}, fh,
                  indent=2)
    print(f"\nwrote {path}")
