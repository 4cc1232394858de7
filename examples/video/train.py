"""Video classification that needs the time axis: C2D with and without space-time non-local blocks.

    python examples/video/train.py [--steps N] [--seed 0] [--world-size 1] [--dtype float64]
                                   [--init-noise 0 --noise-seed 0]

Clips of 4 frames (28x28) show one scikit-learn digit moving in a straight line; in the last frame
it either stays the same digit (label 1) or turns into a digit of another class (label 0). Every
single frame looks like an ordinary digit, so only comparing frames across time tells the classes
apart. The C2D baseline (2-D convolutions per frame, average pooling over space and time, a linear
classifier) cannot: averaged per-frame features of "A, A, A, B" are not linearly separable from
"A, A, A, A" for every pair of classes. A NonLocal3d block (attention over all T*H*W positions, as
in Wang et al. 2018) compares the frames. The script reports both accuracies and shows that the
block is exactly attention over the T*H*W tokens (torch.nn.MultiheadAttention after conversion).

``--world-size N`` (N > 1) trains the non-local model with context parallelism: N spawned gloo
processes on this machine each hold T / N frames of every clip; the NonLocal3d block runs on
:func:`nlgraph.distributed.aggregate` (process_group=), BatchNorm statistics and the final pooling
are summed across ranks, and gradients are averaged as DDP does, so every step is the
single-process step (to rounding; ``--dtype``, float64 by default). The trajectories still part
after a few hundred steps (any change in rounding is another draw of the recipe), so the two final
accuracies are two draws: the comparison uses its own recipe (CP_STEPS steps, Adam at CP_LR decayed
linearly), which left the initial plateau in every draw measured; see the README.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from nlgraph import NonLocal3d, tasks
from nlgraph.adapters import mha_to_torch, nonlocal_to_mha
from nlgraph.distributed import all_reduce_sum

T, SIZE = 4, 28
# the --world-size comparison's recipe: a lower, linearly decayed learning rate leaves the initial
# plateau in every draw measured (see the README); run() keeps its own (600 steps, lr 3e-3)
CP_STEPS, CP_LR = 1000, 1e-3


def make_clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, T, 28, 28) clips in [0, 1] and (n,) labels (:func:`nlgraph.tasks.moving_digit_clips`)."""
    return tasks.moving_digit_clips(n, seed, frames=T, size=SIZE)


def C2D(nonlocal_blocks: bool, width: int = 32) -> tasks.C2D:  # noqa: N802  (the script's old class name)
    """Per-frame 2-D convolutions, optional space-time NonLocal3d block, pooling, linear classifier."""
    block = (lambda w: NonLocal3d(w, inter_channels=w // 2, sub_sample=True)) if nonlocal_blocks else None
    return tasks.C2D(block, width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch: int = 32) -> None:
    tasks.train(model, x, y, steps, seed, batch=batch, lr=3e-3)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def nonlocal_as_attention_max_diff(model: C2D, x: torch.Tensor) -> float:
    """|NonLocal3d(z) - (z + torch MHA over the T*H*W tokens)| on the block's real input z."""
    model.eval()
    z = model.features(x)
    block = model.nonlocal_block
    mha = mha_to_torch(nonlocal_to_mha(block))
    tokens = z.flatten(2).transpose(1, 2)  # (B, T*H*W, C)
    _, k, v = block.embed(z)  # sub_sample pools keys/values after phi and g
    via_attention = tokens + mha(tokens, k, v, need_weights=False)[0]
    return float((block(z).flatten(2).transpose(1, 2) - via_attention).abs().max())


# ---------------------------------------------------------------------------------------------
# context parallelism: every rank holds frames [t0, t0 + T_r) of every clip
# ---------------------------------------------------------------------------------------------
class GlobalBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose training statistics are over every rank's frames (a differentiable
    all-reduce of the per-channel sums), i.e. the single-process statistics of the whole clip."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims, c = (0, 2, 3, 4), x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        first = all_reduce_sum(torch.cat([x.sum(dims), count]), self.group)  # two passes, as torch's
        total = first[-1]
        mean = first[:c] / total
        centred = x - mean.view(1, c, 1, 1, 1)
        var = all_reduce_sum((centred * centred).sum(dims), self.group) / total
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
        shape = (1, c, 1, 1, 1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def make_context_parallel(model: tasks.C2D, group, method: str = "ring") -> tasks.C2D:
    """Point the NonLocal3d block at ``group`` and make every BatchNorm3d global (in place)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.BatchNorm3d:
                new = GlobalBatchNorm3d(child.num_features, child.eps, child.momentum,
                                        device=child.weight.device, dtype=child.weight.dtype)
                new.load_state_dict(child.state_dict())
                new.group = group
                setattr(mod, child_name, new)
    if isinstance(model.nonlocal_block, NonLocal3d):
        model.nonlocal_block.process_group = group
        model.nonlocal_block.distributed_method = method
    return model


def sharded_logits(model: tasks.C2D, x: torch.Tensor, t0: int, frames: int, group) -> torch.Tensor:
    """The model's logits from this rank's frames ``x`` (B, 1, T_r, H, W) starting at frame ``t0``."""
    t = torch.linspace(0, 1, frames, dtype=x.dtype, device=x.device)[t0:t0 + x.shape[2]]
    t = t.view(1, 1, -1, 1, 1)
    z = model.stem(torch.cat([x, t.expand(x.shape[0], 1, -1, x.shape[3], x.shape[4])], dim=1))
    z = model.top(model.nonlocal_block(z))
    pooled = all_reduce_sum(z.sum(dim=(2, 3, 4)), group) / (frames * z.shape[3] * z.shape[4])
    return model.fc(pooled)


def _cp_worker(rank: int, world: int, tmp: str, steps: int, n_train: int, n_test: int, seed: int,
               dtype: torch.dtype, method: str, lr: float) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    torch.set_num_threads(1)
    try:
        frames = [T // world + (r < T % world) for r in range(world)]
        t0 = sum(frames[:rank])
        sl = slice(t0, t0 + frames[rank])
        x_tr, y_tr = make_clips(n_train, seed)
        x_te, y_te = make_clips(n_test, seed + 1)
        x_tr, x_te = x_tr.to(dtype), x_te.to(dtype)
        model = C2D(nonlocal_blocks=True).to(dtype)
        model.load_state_dict(torch.load(os.path.join(tmp, "init.pt")))
        make_context_parallel(model, dist.group.WORLD, method)
        torch.manual_seed(seed)  # the batches of tasks.train(..., seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = tasks.linear_decay(opt, steps)
        model.train()
        first = None
        for _ in range(steps):
            i = torch.randint(0, x_tr.shape[0], (32,))
            loss = nn.functional.cross_entropy(sharded_logits(model, x_tr[i][:, :, sl], t0, T, None), y_tr[i])
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():  # every rank holds a copy of the loss: average, as DDP does
                dist.all_reduce(p.grad)
                p.grad /= world
            if first is None:
                first = {"loss": float(loss.detach()), "grads": [p.grad.clone() for p in model.parameters()]}
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            logits = sharded_logits(model, x_te[:, :, sl], t0, T, None)
        if rank == 0:
            torch.save({"accuracy": float((logits.argmax(1) == y_te).float().mean()), **first,
                        "params": [p.detach() for p in model.parameters()],
                        "buffers": [b.detach() for b in model.buffers()]}, os.path.join(tmp, "out.pt"))
    finally:
        dist.destroy_process_group()


def run_context_parallel(world: int, steps: int = CP_STEPS, n_train: int = 3000, n_test: int = 500,
                         seed: int = 0, dtype: torch.dtype = torch.float64, method: str = "ring",
                         lr: float = CP_LR, init_noise: float = 0.0, noise_seed: int = 0) -> dict:
    """Train the non-local model on one process and on ``world`` spawned gloo processes (frames
    sharded) from the same initial weights (those :func:`run` gives its non-local model) and the same
    batches: both test accuracies, and how far the first step's loss and gradients and the final
    parameters are apart.

    Every context-parallel step is the single-process step to rounding (``tests/test_examples.py``).
    The trajectories still part after a few hundred steps whenever the rounding differs (1 vs 2 torch
    threads, 1 vs 2 ranks, float32 or float64), and whether a run leaves the initial plateau (the
    block's BatchNorm scale starts at 0 and the classifier averages over every position, so its first
    gradients nearly cancel) differs between such draws: the accuracies are two draws of the
    recipe's spread (measured in the README). ``init_noise`` > 0 multiplies the shared initial
    weights by (1 + init_noise N(0, 1)) (generator seeded with ``noise_seed``) before both runs: another
    draw of the same recipe, for measuring that spread."""
    if not 1 < world <= T:
        raise ValueError(f"world must be in 2..{T} (the clips have {T} frames), got {world}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not init_noise >= 0:
        raise ValueError(f"init_noise must be >= 0, got {init_noise!r}")
    import torch.multiprocessing as mp

    # the RNG stream run() has when it builds its non-local model: clips, the baseline's weights, and
    # the baseline's training (tasks.train re-seeds, then draws one batch index tensor per step)
    torch.manual_seed(seed)
    x_tr, y_tr = make_clips(n_train, seed)
    x_te, y_te = make_clips(n_test, seed + 1)
    C2D(nonlocal_blocks=False)
    torch.manual_seed(seed)
    for _ in range(steps):
        torch.randint(0, x_tr.shape[0], (32,))
    model = C2D(nonlocal_blocks=True).to(dtype)
    if init_noise:
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + init_noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), os.path.join(tmp, "init.pt"))
        mp.start_processes(_cp_worker, args=(world, tmp, steps, n_train, n_test, seed, dtype, method, lr),
                           nprocs=world, join=True, start_method="spawn")
        out = torch.load(os.path.join(tmp, "out.pt"))
    x_tr, x_te = x_tr.to(dtype), x_te.to(dtype)
    torch.manual_seed(seed)
    i = torch.randint(0, x_tr.shape[0], (32,))
    probe = copy.deepcopy(model).train()  # (a training forward updates the BatchNorm statistics)
    loss = nn.functional.cross_entropy(probe(x_tr[i]), y_tr[i])
    grads = torch.autograd.grad(loss, list(probe.parameters()))
    scale = max(float(g.abs().max()) for g in grads)
    gdiff = max(float((a - b).abs().max()) for a, b in zip(grads, out["grads"], strict=True)) / scale
    tasks.train(model, x_tr, y_tr, steps, seed, batch=32, lr=lr, lr_decay=True)
    pairs = zip(model.parameters(), out["params"], strict=True)
    pdiff = max(float((a.detach() - b).abs().max()) for a, b in pairs)
    # the BatchNorm running statistics (the test accuracy reads them): global in both runs
    bdiff = max(float((a.double() - b.double()).abs().max())
                for a, b in zip(model.buffers(), out["buffers"], strict=True))
    return {"one process": accuracy(model, x_te, y_te), f"{world} ranks": out["accuracy"],
            "first step |loss difference|": abs(float(loss.detach()) - out["loss"]),
            "first step max |gradient difference| / max |gradient|": gdiff,
            "max |parameter difference| after training": pdiff,
            "max |BatchNorm statistics difference| after training": bdiff}


def run(steps: int = 600, n_train: int = 3000, n_test: int = 500, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    x_tr, y_tr = make_clips(n_train, seed)
    x_te, y_te = make_clips(n_test, seed + 1)
    results = {}
    for name, nl in (("C2D", False), ("C2D + space-time non-local", True)):
        t = time.perf_counter()
        model = C2D(nonlocal_blocks=nl)
        train(model, x_tr, y_tr, steps, seed)
        results[name] = accuracy(model, x_te, y_te)
        log(f"{name:<28} test accuracy {results[name]:.3f}   ({time.perf_counter() - t:.0f}s training)")
    diff = nonlocal_as_attention_max_diff(model, x_te[:8])
    results["max |NonLocal3d - attention over T*H*W tokens|"] = diff
    log(f"NonLocal3d == torch.nn.MultiheadAttention over T*H*W tokens: max abs difference "
        f"{results['max |NonLocal3d - attention over T*H*W tokens|']:.2e}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per model (default 600; {CP_STEPS} with --world-size)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--method", choices=("ring", "allgather"), default="ring",
                    help="nlgraph.distributed method with --world-size (default ring)")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="precision of the --world-size comparison (default float64)")
    ap.add_argument("--init-noise", type=float, default=0.0,
                    help="with --world-size: multiply the shared initial weights by (1 + this * N(0, 1)), "
                         "another draw of the recipe (default 0)")
    ap.add_argument("--noise-seed", type=int, default=0, help="seed of --init-noise (default 0)")
    ap.add_argument("--world-size", type=int, default=1,
                    help=f"train the non-local model on this many gloo processes too, 2..{T} (default 1)")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if not 1 <= args.world_size <= T:
        ap.error(f"--world-size must be in 1..{T}")
    if not args.init_noise >= 0:
        ap.error("--init-noise must be >= 0")
    if args.world_size == 1:
        run(args.steps or 600, seed=args.seed)
        return 0
    t = time.perf_counter()
    res = run_context_parallel(args.world_size, args.steps or CP_STEPS, seed=args.seed, method=args.method,
                               dtype=getattr(torch, args.dtype), init_noise=args.init_noise,
                               noise_seed=args.noise_seed)
    print(f"C2D + space-time non-local, {args.dtype}, same initial weights and batches "
          f"({time.perf_counter() - t:.0f}s):")
    for name, val in res.items():
        print(f"  {name:<28} {val:.3g}" if "difference" in name else f"  {name:<28} test accuracy {val:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
