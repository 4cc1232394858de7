"""Shared benchmark harness: timing, peak-memory subprocesses, tables and JSON.

Timing runs ours and the peer in the same process with the same torch thread count, after a
warm-up, in turns (ours, peer path 1, peer path 2, ours, ...), and reports each side's median. A
peer that has several paths for a case (``scaled_dot_product_attention``'s flash / efficient /
cuDNN / math kernels) has every path that can run the case timed, and the row compares against
the fastest, named in the row (``sdpa[flash-cpu]``). Which kernel ran is not assumed: each path
is forced (``torch.nn.attention.sdpa_kernel``; a path that cannot run the case raises and is left
out), and the kernels the profiler saw in one call of the chosen path are recorded in the JSON
(``peer_kernels``). Peak memory is measured, never computed: each case is re-run once in a fresh
subprocess that resets the kernel's peak-RSS mark (VmHWM) just before the call and reports how far
the peak rose above the RSS at that moment.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Callable, Hashable, Mapping, Optional, TypeVar

import torch

K = TypeVar("K", bound=Hashable)


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


def time_round_robin(fns: Mapping[K, Callable[[], object]], repeats: int = 3,
                     warmup: int = 1) -> dict[K, float]:
    """Median wall time of each function, timed in turns (a, b, c, a, b, c, ...) after ``warmup``
    untimed calls of each: all sample the same stretch of machine state (on a shared or virtual
    machine, speed drifts by 10-20% over seconds, which timing one after the other turns into bias)."""
    return {name: statistics.median(t) for name, t in time_samples(fns, repeats, warmup).items()}


def time_samples(fns: Mapping[K, Callable[[], object]], repeats: int = 3,
                 warmup: int = 1) -> dict[K, list[float]]:
    """Every timed run of each function (seconds), timed in turns as :func:`time_round_robin` does."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[K, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 3,
              warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn_a`` and ``fn_b`` timed alternately (a, b, a, b, ...); see
    time_round_robin."""
    t = time_round_robin({"a": fn_a, "b": fn_b}, repeats=repeats, warmup=warmup)
    return t["a"], t["b"]


def sdpa_paths(device: torch.device | str) -> list[str]:
    """The ``scaled_dot_product_attention`` kernels worth trying on ``device`` (each is forced in turn).

    On CPU: the fused flash kernel (``flash-cpu``, 4-D input only) and the unfused math path."""
    if torch.device(device).type == "cuda":
        return ["flash", "efficient", "cudnn", "math"]
    return ["flash-cpu", "math"]


def sdpa_forced(path: Optional[str]):
    """A context that lets SDPA run only ``path`` (it raises where that kernel cannot run the case)."""
    if path is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "flash-cpu": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "math": SDPBackend.MATH}
    return sdpa_kernel(backends[path])


def kernels_seen(fn: Callable[[], object], pattern: str) -> list[str]:
    """Names of the profiled operators of one ``fn()`` call that contain ``pattern`` (the evidence of
    which kernel ran, e.g. ``aten::_scaled_dot_product_flash_attention_for_cpu``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if pattern in e.key})


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
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs); "
                           "peak memory would be wrong")
    before = current_rss_bytes()
    run()
    rise = max(0, peak_rss_bytes() - before)
    print(json.dumps({"peak_mib": rise / 2**20}))


def machine() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as a Markdown table; ``columns`` are (key, header) pairs (``|`` in a cell is escaped)."""
    print(f"\n{title}  ({date.today().isoformat()}, {machine()})\n")
    print("| " + " | ".join(h.replace("|", "\\|") for _, h in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        cells = []
        for key, _ in columns:
            val = r.get(key)
            if isinstance(val, float):
                cells.append(f"{val:.3g}" if not key.startswith("ratio") else f"{val:.2f}")
            else:
                cells.append("-" if val is None else str(val))
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    sys.stdout.flush()


def write_json(path: str, name: str, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "date": date.today().isoformat(), "machine": machine(),
                   "rows": rows}, fh, indent=2)
    print(f"\nwrote {path}")


def compare_pairs(pairs: list[dict], module: str, make_step: Callable[[dict], Callable[[], object]],
                  repeats: int, memory: bool, describe: Callable[[dict], str],
                  peer_paths: Optional[Callable[[dict], Optional[list[str]]]] = None,
                  kernel_pattern: Optional[str] = None) -> list[dict]:
    """Time ours and the peer of each pair in this process, in turns; measure peak memory in subprocesses.

    Each pair holds ``ours`` and ``peer`` implementation names plus the case parameters; a case for
    one side is the pair's parameters with ``impl`` set (and, for a peer with several paths, ``path``).
    ``make_step(case)`` returns the function to time. ``peer_paths(pair)`` lists the peer's paths to
    try (None: one path); every path that runs is timed, the fastest is the row's peer, named
    ``peer[path]``, and all are recorded (``peer_paths_s``; ``peer_skipped``: paths that cannot run
    the case, with the reason). ``kernel_pattern``: record the profiled operators of one call of each
    side whose names contain it (``ours_kernels``, ``peer_kernels``). Returns rows with at least
    ``name``, ``ours_s``, ``peer``, ``peer_s``, ``ratio`` (ours / peer) and, with ``memory``, the
    peaks in MiB.
    """
    rows = []
    mem_cache: dict[tuple, Optional[float]] = {}
    for p in pairs:
        params = {k: v for k, v in p.items() if k not in ("ours", "peer")}
        paths = peer_paths(p) if peer_paths is not None else None
        ours_case = dict(params, impl=p["ours"])
        fns: dict[Optional[str], Callable[[], object]] = {"ours": make_step(ours_case)}
        cases: dict[Optional[str], dict] = {}
        skipped: dict[Optional[str], str] = {}
        candidates: list[Optional[str]] = list(paths) if paths else [None]
        for path in candidates:
            case = dict(params, impl=p["peer"]) if path is None else dict(params, impl=p["peer"], path=path)
            step = make_step(case)
            try:
                step()  # a forced kernel that cannot run the case raises here
            except RuntimeError as exc:
                skipped[path] = str(exc).strip().splitlines()[0][:200]
                continue
            fns[path] = step
            cases[path] = case
        if not cases:  # e.g. a compiled peer that does not compile here: the row is left out, said so
            print(f"  {describe(p)}: left out, no path of {p['peer']} runs it: {skipped}", file=sys.stderr,
                  flush=True)
            continue
        samples = time_samples(fns, repeats=repeats)
        times = {name: statistics.median(t) for name, t in samples.items()}
        best = min(cases, key=lambda path: times[path])
        peer_name = p["peer"] if best is None else f"{p['peer']}[{best}]"
        rec: dict = {}
        if memory:
            for role, case in (("ours", ours_case), ("peer", cases[best])):
                key = tuple(sorted(case.items()))
                if key not in mem_cache:
                    mem_cache[key] = measure_peak_in_subprocess(module, case)
                rec[f"{role}_peak_mib"] = mem_cache[key]
        row = dict(params, name=describe(p), ours=p["ours"], peer=peer_name, ours_s=times["ours"],
                   peer_s=times[best], ratio=times["ours"] / times[best],
                   # the fastest run of each side: on a machine shared with other jobs, preemption only
                   # ever adds time, so min / min is the steadier estimate of the ratio
                   ours_min_s=min(samples["ours"]), peer_min_s=min(samples[best]),
                   ratio_min=min(samples["ours"]) / min(samples[best]),
                   ours_peak_mib=rec.get("ours_peak_mib"), peer_peak_mib=rec.get("peer_peak_mib"))
        if paths:
            row["peer_paths_s"] = {str(path): times[path] for path in cases}
            row["peer_skipped"] = skipped
        if kernel_pattern:
            row["ours_kernels"] = kernels_seen(fns["ours"], kernel_pattern)
            row["peer_kernels"] = kernels_seen(fns[best], kernel_pattern)
        rows.append(row)
        print(f"  {row['name']:<44} vs {row['peer']:<18} ours {row['ours_s']:.4f}s peer {row['peer_s']:.4f}s "
              f"ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    return rows


COLUMNS = [("name", "case"), ("peer", "peer"), ("ours_s", "ours s"), ("peer_s", "peer s"),
           ("ratio", "ours/peer"), ("ours_peak_mib", "ours MiB"), ("peer_peak_mib", "peer MiB")]


def standard_parser(prog: str, doc: str):
    """The options every benchmark takes: --json, --quick, --repeats, --no-memory, --threads, --sizes,
    --dims (+ the hidden case runner)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch intra-op threads (default: torch's, one per core); peers outside torch "
                         "(pydensecrf, scikit-image) are single-threaded either way")
    ap.add_argument("--sizes", type=int, nargs="+", metavar="N",
                    help="problem sizes to run: N (core, graph) or the feature map side (nonlocal); "
                         "default: their own")
    ap.add_argument("--dims", type=int, nargs="+", metavar="D",
                    help="feature widths d to run (core; default: its own)")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    return ap


def parse_args(name: str, doc: str, argv, extra: Optional[Callable[..., None]] = None):
    """Parse a benchmark's standard options (one-line error for a bad --repeats); ``extra(parser)``
    adds a benchmark's own options."""
    ap = standard_parser(f"nlgraph bench {name}", doc)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    for opt in ("sizes", "dims"):
        if any(x < 1 for x in getattr(args, opt) or ()):
            ap.error(f"--{opt} must be positive")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return args


def pairs_main(argv, name: str, doc: str, module: str, plan: Callable[..., list[dict]],
               make_step: Callable[[dict], Callable[[], object]], memory_case: Callable[[dict], None],
               describe: Callable[[dict], str], title: str,
               peer_paths: Optional[Callable[[dict], Optional[list[str]]]] = None,
               kernel_pattern: Optional[str] = None, columns: Optional[list[tuple[str, str]]] = None) -> int:
    """The whole command line of an ours-vs-peer benchmark: options, pairs, table (``columns``, default
    COLUMNS), JSON. ``plan(quick, sizes=..., dims=...)`` lists the pairs (sizes/dims: None = its own)."""
    import json as _json

    args = parse_args(name, doc, argv)
    if args.memory_case:
        memory_case(_json.loads(args.memory_case))
        return 0
    rows = compare_pairs(plan(args.quick, sizes=args.sizes, dims=args.dims), module, make_step, args.repeats,
                         not args.no_memory, describe, peer_paths=peer_paths, kernel_pattern=kernel_pattern)
    print_table(title, rows, columns or COLUMNS)
    if args.json:
        write_json(args.json, name, rows)
    return 0
