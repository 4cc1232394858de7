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


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 3,
              warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn_a`` and ``fn_b`` timed alternately (a, b, a, b, ...) after ``warmup``
    untimed calls of each: both sample the same stretch of machine state (on a shared or virtual
    machine, speed drifts by 10-20% over seconds, which timing one after the other turns into bias)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


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


def compare_pairs(pairs: list[dict], module: str, time_case: Callable[[dict, int], float], repeats: int,
                  memory: bool, describe: Callable[[dict], str]) -> list[dict]:
    """Time ours and the peer of each pair in this process; measure peak memory in subprocesses.

    Each pair holds ``ours`` and ``peer`` implementation names plus the case parameters; a case for
    one side is the pair's parameters with ``impl`` set. Returns rows with at least ``name``,
    ``ours_s``, ``peer``, ``peer_s``, ``ratio`` (ours / peer) and, with ``memory``, the peaks in MiB.
    """
    rows = []
    mem_cache: dict[tuple, Optional[float]] = {}
    for p in pairs:
        params = {k: v for k, v in p.items() if k not in ("ours", "peer")}
        rec: dict = {}
        for role in ("ours", "peer"):
            case = dict(params, impl=p[role])
            rec[f"{role}_s"] = time_case(case, repeats)
            if memory:
                key = tuple(sorted(case.items()))
                if key not in mem_cache:
                    mem_cache[key] = measure_peak_in_subprocess(module, case)
                rec[f"{role}_peak_mib"] = mem_cache[key]
        row = dict(params, name=describe(p), ours=p["ours"], peer=p["peer"], ours_s=rec["ours_s"],
                   peer_s=rec["peer_s"], ratio=rec["ours_s"] / rec["peer_s"],
                   ours_peak_mib=rec.get("ours_peak_mib"), peer_peak_mib=rec.get("peer_peak_mib"))
        rows.append(row)
        print(f"  {row['name']:<44} vs {row['peer']:<12} ours {row['ours_s']:.4f}s peer {row['peer_s']:.4f}s "
              f"ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    return rows


COLUMNS = [("name", "case"), ("peer", "peer"), ("ours_s", "ours s"), ("peer_s", "peer s"), ("ratio", "ours/peer"),
           ("ours_peak_mib", "ours MiB"), ("peer_peak_mib", "peer MiB")]


def standard_parser(prog: str, doc: str):
    """The options every benchmark takes: --json, --quick, --repeats, --no-memory (+ the hidden case runner)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch intra-op threads (default: torch's, one per core); peers outside torch "
                         "(pydensecrf, scikit-image) are single-threaded either way")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    return ap


def parse_args(name: str, doc: str, argv):
    """Parse a benchmark's standard options (one-line error for a bad --repeats)."""
    ap = standard_parser(f"nlgraph bench {name}", doc)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return args


def pairs_main(argv, name: str, doc: str, module: str, plan: Callable[[bool], list[dict]],
               time_case: Callable[[dict, int], float], memory_case: Callable[[dict], None],
               describe: Callable[[dict], str], title: str) -> int:
    """The whole command line of an ours-vs-peer benchmark: options, pairs, table, JSON."""
    import json as _json

    args = parse_args(name, doc, argv)
    if args.memory_case:
        memory_case(_json.loads(args.memory_case))
        return 0
    rows = compare_pairs(plan(args.quick), module, time_case, args.repeats, not args.no_memory, describe)
    print_table(title, rows, COLUMNS)
    if args.json:
        write_json(args.json, name, rows)
    return 0
