"""The ``nlgraph`` command line: ``demo``, ``bench NAME``, ``compare``, ``info``."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _benchmarks() -> list[str]:
    from . import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
                  and m.name not in ("harness",))


def _seed(text: str) -> int:
    """argparse type of --seed: an int in [0, 2**64), the range torch and numpy both accept."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {seed}")
    return seed


def _writable(path: str) -> Optional[str]:
    """None if a file can be written at ``path`` (its folder is created), else the reason.

    Probed before the demo's minutes of work: a file that did not exist is created empty and removed.
    """
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "ab"):
            pass
        if not existed:
            os.remove(path)
    except OSError as err:
        return err.strerror or str(err)
    return None


def _cmd_demo(args) -> int:
    from . import demo

    if args.out:
        why = _writable(args.out)
        if why is not None:
            print(f"nlgraph demo: cannot write the figure to {args.out!r}: {why}", file=sys.stderr)
            return 2
    try:
        return demo.main(args)
    except demo.FigureWriteError as err:  # the figure's folder became unwritable while the demo ran
        print(f"nlgraph demo: {err}", file=sys.stderr)
        return 2


def _cmd_bench(args) -> int:
    names = _benchmarks()
    if args.name not in names:
        print(f"nlgraph bench: unknown benchmark {args.name!r}; available: {', '.join(names)}",
              file=sys.stderr)
        return 2
    mod = importlib.import_module(f"nlgraph.bench.{args.name}")
    return int(mod.main(args.args) or 0)


def _cmd_compare(args) -> int:
    from . import compare

    return compare.main(args)


def _cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .dispatch import backend_names, get_backend

    print(f"nlgraph {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"CUDA available: {torch.cuda.is_available()}")
    print("backends (automatic priority order):")
    for name in backend_names():
        doc = (get_backend(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<10} {doc}")
    from .backends import sdpa

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"sdpa kernels on {device} (float32): {sdpa.kernel_summary(device)}")
    print(f"benchmarks: {', '.join(_benchmarks()) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nlgraph",
        description="Non-local blocks, self-attention and dense-CRF mean-field as one message-passing op: "
                    "y_i = (1/C_i) sum_{j in N(i)} f(x_i, x_j) g(x_j).")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("demo", help="run the equivalence tour and print its table (exit 1 if one fails)",
                       description="Build each equivalence live (forward and all gradients, float64) and "
                                   "print a table, then refine a noisy segmentation of a photo with the "
                                   "dense CRF and write a figure; exits non-zero if any equivalence fails.")
    p.add_argument("--seed", type=_seed, default=0,
                   help="random seed for the generated inputs, in [0, 2**64) (default 0)")
    p.add_argument("--out", default="out/nlgraph-demo.png",
                   help="where to write the segmentation figure (default out/nlgraph-demo.png)")
    p.add_argument("--no-figure", dest="out", action="store_const", const="", help="skip the figure")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("bench", help="run a benchmark: nlgraph bench NAME [--json PATH] [...]",
                       description="Run nlgraph/bench/NAME.py; pass --help after NAME for its options.")
    p.add_argument("name", help=f"benchmark name ({', '.join(_benchmarks()) or 'none found'})")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("compare", help="train every non-local variant on the same tasks and seeds: "
                                       "accuracy, cost, memory (table, JSON, figure)",
                       description="Train the non-local family (NL modes, attention, criss-cross, window, "
                                   "GCNet, ANN, LatentGNN, CGNL, DNL, dense CRF, CRF-as-RNN) on generated "
                                   "segmentation and video tasks with the same budget and seeds; print one "
                                   "table per task, write JSON and a figure.")
    from .compare import build_parser as _compare_parser

    _compare_parser(p)
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("info", help="versions, registered backends and benchmarks",
                       description="Print versions, the registered backends in priority order and the "
                                   "benchmarks.")
    p.set_defaults(func=_cmd_info)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
