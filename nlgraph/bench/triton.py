"""``nlgraph bench triton`` (CUDA only): the triton backend vs scaled_dot_product_attention's best kernel.

Forward and forward+backward time and TFLOP/s (4 N M d for the forward, 3.5x that with backward)
against SDPA on the same (1, 8, N, d) tensors, fp16 and bf16, N = M in {1024, 4096, 16384}, d in
{64, 128, 256, 512, 1024}. Every SDPA kernel PyTorch offers on the device (flash, efficient, cuDNN,
math) is forced in turn (``torch.nn.attention.sdpa_kernel``); those that can run the case are
timed and the row compares against the fastest, named ``sdpa[flash]`` etc. (the JSON records
every kernel's time, the ones that could not run and why, and the operators the profiler saw in
one call of the fastest). Plus the Gaussian / C = 1 kernel against its materialised PyTorch
computation (``exp(-cdist^2 / 2) @ v``; SDPA cannot express C = 1). Ratios are ours / peer
(< 1: ours faster). Prints a message and exits 0 without a CUDA GPU.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nlgraph.bench import harness


def _time_cuda(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _softmax_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                 repeats: int) -> Optional[dict]:
    """One softmax case: ours (triton) against every SDPA kernel that can run it; None if none can."""
    import nlgraph

    n, d = q.shape[-2], q.shape[-1]
    flops = 4 * 8 * n * n * d

    def step(fn: Callable[[], torch.Tensor]) -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn()
            return
        fn().sum().backward()

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    ours = _time_cuda(lambda: step(lambda: nlgraph.aggregate(q, k, v, backend="triton")), repeats)
    total = flops * (1 if mode == "fwd" else 3.5)
    paths: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for path in harness.sdpa_paths("cuda"):
        def peer_call(path: str = path) -> None:
            with harness.sdpa_forced(path):
                step(sdpa)
        try:
            paths[path] = _time_cuda(peer_call, repeats)
        except RuntimeError as exc:  # this SDPA kernel does not support the case
            skipped[path] = str(exc).strip().splitlines()[0][:200]
    if not paths:
        return None
    best = min(paths, key=lambda path: paths[path])

    def best_call() -> None:
        with harness.sdpa_forced(best):
            step(sdpa)
    kernels = harness.kernels_seen(best_call, "scaled_dot_product")
    return dict(name=f"softmax {str(q.dtype)[6:]} N={n} d={d} {mode}", ours="triton",
                peer=f"sdpa[{best}]", ours_s=ours, peer_s=paths[best], ratio=ours / paths[best],
                ours_tflops=total / ours / 1e12, peer_tflops=total / paths[best] / 1e12,
                peer_paths_s=paths, peer_skipped=skipped, peer_kernels=kernels)


def _gaussian_row(dtype: torch.dtype, repeats: int) -> dict:
    """The Gaussian / C = 1 kernel against its materialised PyTorch computation."""
    import nlgraph

    g = torch.randn(1, 4096, 8, device="cuda", dtype=dtype)
    val = torch.randn(1, 4096, 16, device="cuda", dtype=dtype)
    aff = nlgraph.Gaussian(1.0, normalize=False)
    ours = _time_cuda(lambda: nlgraph.aggregate(g, g, val, aff, backend="triton"), repeats)
    peer = _time_cuda(lambda: torch.exp(-0.5 * torch.cdist(g.float(), g.float()) ** 2) @ val.float(), repeats)
    return dict(name=f"gaussian C=1 {str(dtype)[6:]} N=4096 d=8 fwd", ours="triton",
                peer="torch[cdist+exp+matmul]", ours_s=ours, peer_s=peer, ratio=ours / peer)


def main(argv=None) -> int:
    args = harness.parse_args("triton", __doc__, argv)
    if not torch.cuda.is_available():
        print("nlgraph bench triton: needs a CUDA GPU; none is available here, nothing measured.")
        return 0

    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384]
    dims = [64, 128] if args.quick else [64, 128, 256, 512, 1024]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for n in sizes:
            for d in dims:
                q, k, v = (torch.randn(1, 8, n, d, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
                for mode in ("fwd", "fwd+bwd"):
                    row = _softmax_row(q, k, v, mode, args.repeats)
                    if row is not None:
                        rows.append(row)
        rows.append(_gaussian_row(dtype, args.repeats))
    columns = harness.COLUMNS[:5] + [("ours_tflops", "ours TFLOP/s"), ("peer_tflops", "peer TFLOP/s")]
    harness.print_table(f"nlgraph bench triton ({torch.cuda.get_device_name()}, median s)", rows, columns)
    if args.json:
        harness.write_json(args.json, "triton", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
