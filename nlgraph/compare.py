"""``nlgraph compare``: every member of the non-local family on the same tasks, budget and seeds.

Each variant is one configuration (f, C, graph) of the one op, dropped as a context head into the
same network (:class:`nlgraph.tasks.SegNet` for segmentation, :class:`nlgraph.tasks.C2D` for video)
and trained with the same optimiser, steps, batches and seeds. Per task the table reports, for each
variant: the (f, C, graph) it instantiates, its parameters, the accuracy (mIoU / top-1 on a fixed
held-out set) as mean and standard deviation over the seeds, the forward+backward time of a
training step (median over every step after two warm-up steps, all seeds), the peak memory of one
training step (measured: the rise of the peak RSS over one forward+backward step in a freshly forked
process, the kernel's VmHWM mark reset just before the step), and the gain over the local baseline
with a 95% t-interval over the seeds (each seed's variant and baseline train on the same data from
the same initial body, so the differences are paired).

The dense CRF (post-processing, 5 mean-field steps) and CRF-as-RNN (a trainable CRF fine-tuned end to
end) run on top of the best head, chosen by mean accuracy on a validation set (not the test set).

Usage: ``nlgraph compare [--task segmentation|video|all] [--variants ...] [--seeds N] [--quick]
[--json PATH] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tasks as T
from ._optional import missing, optional

__all__ = ["Variant", "VARIANTS", "TASKS", "PRESETS", "TaskConfig", "build_model", "run", "main",
           "t_quantile", "paired_interval"]

TASKS = ("segmentation", "video")


# ---------------------------------------------------------------------------------------------
# Wrappers that make a token module or a recurrent module a (B, C, *spatial) head


class TokenAttention(nn.Module):
    """``x + MultiheadAttention(tokens)`` over the positions of a map (out_proj zero: identity at init).

    Args:
        width: E, the map's channels.
        num_heads: H.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        from attention import MultiheadAttention

        self.attn = MultiheadAttention(width, num_heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        t = x.flatten(2).transpose(1, 2)
        y, _ = self.attn(t, t, t, need_weights=False)
        return x + y.transpose(1, 2).reshape(x.shape)


class Recurrent(nn.Module):
    """The same module applied ``times`` times (CCNet's recurrent criss-cross attention, R = 2)."""

    def __init__(self, module: nn.Module, times: int):
        super().__init__()
        self.module, self.times = module, times

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.times):
            x = self.module(x)
        return x


# ---------------------------------------------------------------------------------------------
# The variants


def _nonlocal(mode: str) -> Callable[[str, int], nn.Module]:
    def make(task: str, width: int) -> nn.Module:
        from .nonlocal_blocks import NonLocal2d, NonLocal3d

        cls = NonLocal2d if task == "segmentation" else NonLocal3d
        return cls(width, inter_channels=width // 2, mode=mode, sub_sample=True)
    return make


def _mha(task: str, width: int) -> nn.Module:
    return TokenAttention(width, num_heads=4)


def _criss_cross(task: str, width: int) -> nn.Module:
    from attention import CrissCrossAttention

    return Recurrent(CrissCrossAttention(width), times=2)


def _window(task: str, width: int) -> nn.Module:
    from .blocks import NeighborhoodAttention

    return NeighborhoodAttention(width, radius=2 if task == "segmentation" else (3, 2, 2), num_heads=2)


def _gcnet(task: str, width: int) -> nn.Module:
    from .blocks import GlobalContextBlock

    return GlobalContextBlock(width, reduction=4)


def _ann(task: str, width: int) -> nn.Module:
    from .blocks import PyramidNonLocal

    # the paper's scales on images; a clip's 4 x 7 x 7 map would have more cells (368) than positions
    return PyramidNonLocal(width, inter_channels=width // 2,
                           pool_scales=(1, 3, 6, 8) if task == "segmentation" else (1, 2, 3))


def _latent(task: str, width: int) -> nn.Module:
    from .blocks import LatentGraphBlock

    return LatentGraphBlock(width, num_latent=16)


def _cgnl(task: str, width: int) -> nn.Module:
    from .blocks import CompactNonLocal

    return CompactNonLocal(width, inter_channels=width // 2, groups=4, kernel="gaussian", order=2)


def _dnl(task: str, width: int) -> nn.Module:
    from .blocks import DisentangledNonLocal

    return DisentangledNonLocal(width, inter_channels=width // 2)


@dataclass(frozen=True)
class Variant:
    """One member of the family: its name, what it instantiates and how to build it.

    Attributes:
        name: the command-line name.
        label: a human-readable name.
        f, C, graph: the configuration of the one op it instantiates.
        head: ``(task, width) -> module`` (None: the local baseline, or a CRF on top of the best head).
        tasks: the tasks it applies to.
        crf: "post" (dense CRF after the best head) or "rnn" (CRF-as-RNN fine-tuned on it), else None.
    """

    name: str
    label: str
    f: str
    C: str
    graph: str
    head: Optional[Callable[[str, int], nn.Module]] = None
    tasks: tuple[str, ...] = TASKS
    crf: Optional[str] = None


_CRF_F = "sum_m w_m exp(-|p_i - p_j|^2 / 2 theta^2) (positions)"
VARIANTS: tuple[Variant, ...] = (
    Variant("local", "local CNN (no context head)", "-", "-", "3x3 convolutions only (receptive field)"),
    Variant("nl-gaussian", "NonLocal, gaussian", "exp(x_i . x_j)", "sum_j f", "complete, keys 2x2-pooled",
            _nonlocal("gaussian")),
    Variant("nl-embedded", "NonLocal, embedded gaussian", "exp(theta_i . phi_j)", "sum_j f",
            "complete, keys 2x2-pooled", _nonlocal("embedded_gaussian")),
    Variant("nl-dot", "NonLocal, dot product", "theta_i . phi_j", "M (count)",
            "complete, keys 2x2-pooled (algebra)", _nonlocal("dot_product")),
    Variant("nl-concat", "NonLocal, concatenation", "ReLU(w . [theta_i, phi_j])", "M (count)",
            "complete, keys 2x2-pooled (algebra)", _nonlocal("concatenation")),
    Variant("mha", "MultiheadAttention, 4 heads", "exp(q_i . k_j / sqrt(d_h))", "sum_j f",
            "complete over the tokens", _mha),
    Variant("criss-cross", "CrissCrossAttention, R = 2", "exp(q_i . k_j)", "sum over row + column",
            "criss-cross, applied twice", _criss_cross, tasks=("segmentation",)),
    Variant("window", "NeighborhoodAttention, 2 heads", "exp(q_i . k_j / sqrt(d_h))", "sum over window",
            "LocalWindow r=2 (video: r=(3, 2, 2))", _window),
    Variant("gcnet", "GlobalContextBlock (GCNet)", "exp(w_k . x_j), query-independent", "sum_j f",
            "1 context node <- all N", _gcnet),
    Variant("ann", "PyramidNonLocal (ANN, APNB)", "exp(q_i . k_m / sqrt(d))", "sum_m f",
            "N -> M pooled cells, scales (1, 3, 6, 8); video (1, 2, 3)", _ann),
    Variant("latent", "LatentGraphBlock (LatentGNN)", "psi_k(x_i); softmax(cos) among latents", "1; sum f",
            "N -> K = 16 latents -> N (algebra)", _latent),
    Variant("cgnl", "CompactNonLocal (CGNL)", "Taylor-2 Gaussian of channel-position scalars", "1",
            "all (channel, position) nodes, 4 groups (algebra)", _cgnl),
    Variant("dnl", "DisentangledNonLocal (DNL)", "whitened exp(q_i . k_j / (sqrt(d) tau)) + exp(w_m . x_j)",
            "sum_j f (each term)", "complete + 1 unary node", _dnl),
    Variant("crf", "+ dense CRF on the best head", _CRF_F, "1", "complete, j != i (permutohedral), 5 steps",
            tasks=("segmentation",), crf="post"),
    Variant("crf-rnn", "+ CRF-as-RNN on the best head", _CRF_F + ", trainable", "1",
            "complete, j != i (permutohedral), 5 steps, fine-tuned", tasks=("segmentation",), crf="rnn"),
)
_BY_NAME = {v.name: v for v in VARIANTS}


# ---------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class TaskConfig:
    """The budget and the data of one task (every variant gets the same)."""

    steps: int
    batch: int
    lr: float
    width: int
    n_train: int
    n_val: int
    n_test: int
    data: dict = field(default_factory=dict)  # digit_scenes / moving_digit_clips keyword arguments
    dilations: tuple[int, ...] = (1, 1)  # segmentation CNN
    stride: int = 2  # segmentation: output stride of the CNN; video: spatial stride of the C2D stem
    crf_steps: int = 0  # CRF-as-RNN fine-tuning steps


_SEG = dict(size=32, scale=1, separation=16, keep=0.4, corrupt_noise=0.25)
# two digit classes: with all ten the same networks stayed at chance for 700 steps (one seed, measured)
_VID = dict(frames=4, size=28, scale=2, speed=3, classes=(0, 1))
PRESETS: dict[str, dict[str, TaskConfig]] = {
    "full": {
        "segmentation": TaskConfig(steps=300, batch=16, lr=3e-3, width=32, n_train=2000, n_val=200,
                                   n_test=300, data=_SEG, crf_steps=60),
        "video": TaskConfig(steps=300, batch=16, lr=3e-3, width=32, n_train=3000, n_val=200, n_test=500,
                            data=_VID, stride=4),
    },
    "quick": {
        "segmentation": TaskConfig(steps=50, batch=16, lr=3e-3, width=16, n_train=400, n_val=64, n_test=100,
                                   data=_SEG, crf_steps=5),
        "video": TaskConfig(steps=50, batch=16, lr=3e-3, width=16, n_train=400, n_val=64, n_test=100,
                            data=_VID, stride=4),
    },
    "tiny": {  # the test suite's smoke run: one small step per variant
        "segmentation": TaskConfig(steps=1, batch=4, lr=3e-3, width=8, n_train=8, n_val=4, n_test=4,
                                   data=dict(_SEG, size=24, separation=12), crf_steps=1),
        "video": TaskConfig(steps=1, batch=4, lr=3e-3, width=8, n_train=8, n_val=4, n_test=4,
                            data=dict(_VID, size=16, scale=1, speed=2), stride=4),
    },
}


def _dataset(task: str, cfg: TaskConfig, n: int, seed: int) -> tuple[Tensor, Tensor]:
    if task == "segmentation":
        return T.digit_scenes(n, seed, **cfg.data)
    return T.moving_digit_clips(n, seed, **cfg.data)


def build_model(task: str, variant: Variant, cfg: TaskConfig) -> nn.Module:
    """The task's network with the variant's head (a fresh initialisation from torch's global RNG)."""
    make_head = variant.head
    head = None if make_head is None else (lambda width: make_head(task, width))
    if task == "segmentation":
        return T.SegNet(head, cfg.width, cfg.dilations, cfg.stride)
    return T.C2D(head, cfg.width, cfg.stride)


def _crf(trainable: bool) -> nn.Module:
    from crf import DenseCRF

    # a mild smoothness kernel: on these thin strokes stronger kernels cost mIoU (examples/segmentation)
    return DenseCRF(T.NUM_CLASSES, theta_alpha=3.0, theta_beta=1.0, theta_gamma=1.0, w_appearance=0.0,
                    w_smoothness=0.05, num_iterations=5, trainable=trainable)


def _crf_loss(model: nn.Module, crf: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(inputs: Tensor, targets: Tensor) -> Tensor:  # CRF-as-RNN: the loss sees the CRF's marginals
        q = crf(model(inputs), inputs.expand(-1, 3, -1, -1))
        return F.nll_loss(torch.log(q.clamp_min(1e-8)), targets)
    return loss


@torch.no_grad()
def _predict(task: str, model: nn.Module, x: Tensor, crf: Optional[nn.Module] = None,
             chunk: int = 64) -> Tensor:
    model.eval()
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        logits = model(xb)
        if crf is not None:
            logits = crf(logits, xb.expand(-1, 3, -1, -1))
        out.append(logits.argmax(1))
    return torch.cat(out)


def _accuracy(task: str, pred: Tensor, y: Tensor) -> float:
    if task == "segmentation":
        return T.miou(pred, y)
    return float((pred == y).float().mean())


# ---------------------------------------------------------------------------------------------
# Statistics


def _t_cdf(t: float, df: int) -> float:
    """Student's t CDF for t >= 0: 1/2 plus Simpson's rule on the density over [0, t] (1000 panels)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n, h = 1000, t / 1000

    def pdf(u: float) -> float:
        return c * (1 + u * u / df) ** (-(df + 1) / 2)

    return 0.5 + h / 3 * (pdf(0.0) + pdf(t) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, n)))


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom, by bisection on the CDF."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95
                    ) -> tuple[float, Optional[float], Optional[float]]:
    """Mean of a - b over paired seeds and its t-interval (None bounds with a single seed)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, None, None
    half = t_quantile(0.5 + level / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# Peak memory of one training step, in a freshly forked process


def _current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _memory_case(task: str, name: str, base: Optional[str], preset: str, threads: int) -> float:
    """Build the variant's model and a batch, reset VmHWM, run one step; the peak RSS rise in MiB."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = PRESETS[preset][task]
    variant = _BY_NAME[name]
    model = build_model(task, _BY_NAME[base] if variant.crf and base else variant, cfg)
    if task == "segmentation":
        s = cfg.data["size"]
        x, y = torch.rand(cfg.batch, 1, s, s), torch.randint(0, T.NUM_CLASSES, (cfg.batch, s, s))
    else:
        d = cfg.data
        x, y = torch.rand(cfg.batch, 1, d["frames"], d["size"], d["size"]), torch.randint(0, 2, (cfg.batch,))
    crf = _crf(trainable=variant.crf == "rnn") if variant.crf else None
    model.train()
    _reset_peak_rss()
    before = _current_rss()
    if variant.crf == "post":
        _predict(task, model, x, crf)
    else:
        loss = _crf_loss(model, crf)(x, y) if crf is not None else F.cross_entropy(model(x), y)
        loss.backward()
    return max(0, _peak_rss() - before) / 2**20


def _memory_server() -> int:
    """``python -m nlgraph.compare --memory-server``: import everything once, then fork one child per case.

    Reads one JSON case per line on stdin and answers one JSON line per case on stdout. The server
    never runs a tensor op itself, so each forked child starts from the same clean state: torch,
    nlgraph and every backend imported, no heap grown by an earlier case.
    """
    import attention  # noqa: F401
    import crf  # noqa: F401

    from . import affinity as A
    from . import graph as G
    from .core import aggregate

    # What a first call of the op does once (import the backends and the optional packages the dispatch
    # probes, e.g. triton and torch_geometric: ~175 MiB here) happens in the server, not in a measured
    # step. One thread, so no OpenMP pool exists when the server forks.
    torch.set_num_threads(1)
    q = torch.randn(1, 4, 2)
    for aff, graph in ((A.Softmax(), None), (A.DotProduct(), None), (A.Gaussian(1.0, normalize=False), None),
                       (A.Softmax(), G.LocalWindow((2, 2), 1)), (A.Softmax(), G.CrissCross((2, 2)))):
        aggregate(q, q, q, aff, graph)

    for line in sys.stdin:
        case = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer, exit without running the server's cleanup
            os.close(r)
            try:
                answer: Any = {"peak_mib": _memory_case(**case)}
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            reply = fh.read()
        os.waitpid(pid, 0)
        print(reply or json.dumps({"error": "the measuring process died"}), flush=True)
    return 0


class MemoryMeter:
    """Peak RSS rise of one training step per variant, each in a process forked from a clean server."""

    def __init__(self) -> None:
        import subprocess

        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-m", "nlgraph.compare", "--memory-server"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def measure(self, task: str, name: str, base: Optional[str], preset: str,
                threads: int) -> Optional[float]:
        """The peak in MiB, or None (with a note on stderr) when it could not be measured."""
        case = dict(task=task, name=name, base=base, preset=preset, threads=threads)
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline() or '{"error": "the memory server exited"}')
        except (OSError, ValueError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in reply:
            print(f"nlgraph compare: peak memory of {task}/{name} not measured ({reply['error']})",
                  file=sys.stderr)
            return None
        return float(reply["peak_mib"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# The run


class _Progress:
    """tqdm over all training steps when tqdm is installed; otherwise one line per trained model."""

    def __init__(self, total: int, enabled: bool):
        tqdm = getattr(optional("tqdm"), "tqdm", None) if enabled else None
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False) if tqdm else None
        self.enabled = enabled

    def start(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"  {text} ...", file=sys.stderr, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _machine(threads: int) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} torch thread(s), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def run(task_names: Sequence[str] = TASKS, variant_names: Optional[Sequence[str]] = None, seeds: int = 3,
        preset: str = "full", threads: int = 1, memory: bool = True, progress: bool = True,
        log: Callable[[str], None] = print, steps: Optional[int] = None) -> dict:
    """Train and measure every requested variant on every requested task; return the JSON document.

    Args:
        task_names: tasks to run ("segmentation", "video").
        variant_names: variants (default all); ``local`` is always added (gains are measured against it),
            and a CRF variant brings the heads it chooses the best from.
        seeds: seeds 0 .. seeds - 1; each trains every variant on that seed's data and initial body.
        preset: "full", "quick" or "tiny" (budgets in :data:`PRESETS`).
        threads: torch intra-op threads during the run (1 by default: one core, stable timings on a
            shared machine).
        memory: measure the peak memory of a step per variant (forked processes).
        progress: show progress (tqdm when installed).
        log: where the tables go.
        steps: override the preset's training steps (and CRF-as-RNN steps) for every task.
    """
    wanted = list(_BY_NAME) if variant_names is None else list(dict.fromkeys(variant_names))
    unknown = [v for v in wanted if v not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {', '.join(_BY_NAME)}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if "local" not in wanted:
        wanted.insert(0, "local")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    rows: list[dict] = []
    try:
        configs = {t: PRESETS[preset][t] for t in task_names}
        if steps is not None:
            configs = {t: TaskConfig(**{**asdict(c), "steps": steps, "crf_steps": min(c.crf_steps, steps)})
                       for t, c in configs.items()}
        plan = {t: [_BY_NAME[v] for v in wanted if t in _BY_NAME[v].tasks] for t in task_names}
        for t, vs in plan.items():  # a CRF on the best head needs the heads
            if any(v.crf for v in vs) and not any(v.head for v in vs):
                plan[t] = [v for v in VARIANTS if v.head and t in v.tasks] + vs
            plan[t] = sorted(set(plan[t]), key=VARIANTS.index)
        total = sum(seeds * (len([v for v in vs if not v.crf]) * configs[t].steps
                             + (configs[t].crf_steps if any(v.crf == "rnn" for v in vs) else 0))
                    for t, vs in plan.items())
        bar = _Progress(total, progress)
        meter = MemoryMeter() if memory else None
        try:
            for t in task_names:
                rows += _run_task(t, plan[t], configs[t], seeds, preset, threads, meter, bar)
        finally:
            bar.close()
            if meter is not None:
                meter.close()
    finally:
        torch.set_num_threads(old_threads)
    duration = time.perf_counter() - started
    doc = {"benchmark": "compare", "date": date.today().isoformat(), "machine": _machine(threads),
           "preset": preset, "seeds": list(range(seeds)), "duration_s": duration,
           "memory_method": "peak RSS rise (VmHWM reset) over one training step in a freshly forked process",
           "time_method": "median forward+backward wall time of a training step (2 warm-up steps skipped)",
           "settings": {t: asdict(c) for t, c in configs.items()}, "rows": rows}
    for t in task_names:
        _print_table(t, [r for r in rows if r["task"] == t], configs[t], seeds, log)
    log(f"\n{len(rows)} rows, {seeds} seed(s), preset {preset!r}, {_machine(threads)}; took {duration:.0f}s")
    return doc


def _run_task(task: str, variants: list[Variant], cfg: TaskConfig, seeds: int, preset: str, threads: int,
              meter: Optional[MemoryMeter], bar: _Progress) -> list[dict]:
    x_test, y_test = _dataset(task, cfg, cfg.n_test, seed=10_000)  # one test set for every seed
    trained = [v for v in variants if not v.crf]
    acc: dict[str, list[float]] = {v.name: [] for v in variants}
    val: dict[str, list[float]] = {v.name: [] for v in trained}
    timers: dict[str, T.StepTimer] = {v.name: T.StepTimer() for v in variants}
    params: dict[str, int] = {}
    models: dict[tuple[str, int], nn.Module] = {}
    data = {}
    for seed in range(seeds):
        x_tr, y_tr = _dataset(task, cfg, cfg.n_train, seed=seed)
        x_val, y_val = _dataset(task, cfg, cfg.n_val, seed=1_000 + seed)
        data[seed] = (x_tr, y_tr, x_val, y_val)
        for v in trained:
            bar.start(f"{task} {v.name} seed {seed}")
            torch.manual_seed(seed)  # the same initial body for every variant of this seed
            model = build_model(task, v, cfg)
            params[v.name] = _n_params(model)
            T.train(model, x_tr, y_tr, cfg.steps, seed=seed, batch=cfg.batch, lr=cfg.lr, timer=timers[v.name],
                    progress=bar.step)
            acc[v.name].append(_accuracy(task, _predict(task, model, x_test), y_test))
            val[v.name].append(_accuracy(task, _predict(task, model, x_val), y_val))
            models[(v.name, seed)] = model
    heads = [v for v in trained if v.head is not None]
    best = max(heads, key=lambda v: statistics.fmean(val[v.name])) if heads else None
    head_params = {v.name: params[v.name] - params.get("local", 0) for v in trained}
    for v in (v for v in variants if v.crf):
        if best is None:
            continue
        for seed in range(seeds):
            model = models[(best.name, seed)]
            if v.crf == "post":
                crf = _crf(trainable=False)
                acc[v.name].append(_accuracy(task, _predict(task, model, x_test, crf), y_test))
                xb = data[seed][0][:cfg.batch]
                for _ in range(3):  # forward time of model + CRF on a training batch
                    start = time.perf_counter()
                    _predict(task, model, xb, crf)
                    timers[v.name].times.append(time.perf_counter() - start)
                params[v.name] = params[best.name]
            else:
                bar.start(f"{task} {v.name} on {best.name} seed {seed}")
                model = copy.deepcopy(model)
                crf = _crf(trainable=True)
                x_tr, y_tr = data[seed][:2]
                T.train(model, x_tr, y_tr, cfg.crf_steps, seed=seed + 2, batch=cfg.batch, lr=1e-3,
                        loss_fn=_crf_loss(model, crf), extra=list(crf.parameters()), timer=timers[v.name],
                        progress=bar.step)
                acc[v.name].append(_accuracy(task, _predict(task, model, x_test, crf), y_test))
                params[v.name] = params[best.name] + _n_params(crf)
        head_params[v.name] = params[v.name] - params.get("local", 0)
    rows = []
    for v in variants:
        if not acc[v.name]:
            continue
        a = acc[v.name]
        gain, lo, hi = paired_interval(a, acc["local"])
        base = best.name if v.crf and best else None
        over = paired_interval(a, acc[base]) if base else (None, None, None)
        rows.append({
            "variant": v.name, "label": v.label, "task": task, "f": v.f, "C": v.C, "graph": v.graph,
            "params": params[v.name], "head_params": head_params[v.name],
            "accuracy_mean": statistics.fmean(a), "accuracy_std": statistics.stdev(a) if len(a) > 1 else 0.0,
            "accuracies": a, "metric": "mIoU" if task == "segmentation" else "top-1",
            "val_accuracy_mean": statistics.fmean(val[v.name]) if v.name in val else None,
            "seeds": list(range(seeds)), "gain_mean": gain, "gain_ci_low": lo, "gain_ci_high": hi,
            "time_s": timers[v.name].median(skip=0 if v.crf == "post" else 2),
            "time_kind": "forward (model + CRF)" if v.crf == "post" else "forward+backward",
            "peak_mib": meter.measure(task, v.name, base, preset, threads) if meter is not None else None,
            "base": base, "gain_over_base_mean": over[0], "gain_over_base_ci_low": over[1],
            "gain_over_base_ci_high": over[2],
        })
    return rows


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _verdict(row: dict) -> str:
    """helps / hurts (the 95% interval excludes 0) or no clear gain; CRF rows judged against their base."""
    if row["variant"] == "local":
        return "baseline"
    key = "gain_over_base" if row["base"] else "gain"
    lo, hi = row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    if lo is None:
        return "one seed"
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "no clear gain"
    return f"{verdict} ({row['gain_over_base_mean']:+.3f} over {row['base']})" if row["base"] else verdict


def _print_table(task: str, rows: list[dict], cfg: TaskConfig, seeds: int,
                 log: Callable[[str], None]) -> None:
    metric = "mIoU" if task == "segmentation" else "top-1"
    log(f"\n{task}: {metric} on {cfg.n_test} held-out samples, mean +- std over {seeds} seed(s); "
        f"{cfg.steps} steps of batch {cfg.batch}; gain over local with a 95% t-interval over paired seeds\n")
    log(f"| variant | f | C | graph | params | {metric} | gain vs local [95% CI] | verdict | ms/step | "
        f"peak MiB |")  # CRF rows: the verdict is over the head they refine
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = "" if r["gain_ci_low"] is None else f" [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}]"
        gain = "-" if r["variant"] == "local" else f"{r['gain_mean']:+.3f}{ci}"
        ms = "-" if r["time_s"] is None else f"{1000 * r['time_s']:.1f}"
        name = r["variant"] + (f" ({r['base']})" if r["base"] else "")
        log(f"| {name} | {r['f']} | {r['C']} | {r['graph']} | {r['params']:,} | "
            f"{r['accuracy_mean']:.3f} +- {r['accuracy_std']:.3f} | {gain} | {_verdict(r)} | {ms}"
            f"{' (fwd)' if r['variant'] == 'crf' else ''} | {_fmt(r['peak_mib'], '.1f')} |")


def figure(doc: dict, path: str) -> Optional[str]:
    """Accuracy vs time per step, one point per variant with std error bars, one panel per task."""
    mpl = optional("matplotlib")
    if mpl is None:
        return missing("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in doc["rows"]))
    fig, axes = plt.subplots(1, len(task_names), figsize=(6.5 * len(task_names), 5), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        rows = [r for r in doc["rows"] if r["task"] == task and r["time_s"]]
        for r in rows:
            if r["variant"] == "local":
                ax.axhline(r["accuracy_mean"], color="black", lw=0.8, ls="--", alpha=0.6)
            style = dict(fmt="s", color="tab:red") if r["base"] else dict(fmt="o")
            if r["variant"] == "local":
                style = dict(fmt="o", color="black")
            bar = ax.errorbar(1000 * r["time_s"], r["accuracy_mean"], yerr=r["accuracy_std"], capsize=3,
                              **style)
            ax.scatter([1000 * r["time_s"]] * len(r["accuracies"]), r["accuracies"], s=12, marker="x",
                       color=bar[0].get_color(), alpha=0.6, linewidths=0.8)  # each seed
            ax.annotate(r["variant"], (1000 * r["time_s"], r["accuracy_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("time per training step (ms, forward+backward; crf: forward)")
        ax.set_ylabel(rows[0]["metric"] if rows else "accuracy")
        ax.set_title(f"{task}: mean +- std over {len(doc['seeds'])} seed(s) (x: each seed)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"nlgraph compare ({doc['preset']}, {doc['date']}, {doc['machine']})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def build_parser(ap: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of ``nlgraph compare`` (added to ``ap`` when given)."""
    ap = ap or argparse.ArgumentParser(prog="nlgraph compare", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all", help="which task (default all)")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help=f"variants to train (default all): {', '.join(_BY_NAME)}; local is always included")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="a small budget (a few minutes on 2 cores)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON (default OUT/compare.json)")
    ap.add_argument("--out", metavar="DIR", default="out",
                    help="where the figure (and the JSON) go (default out)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # override the budget (tests)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke preset
    return ap


def _command(args: Any, seeds: int) -> str:
    """The canonical command line that reproduces this run."""
    parts = ["nlgraph compare", f"--task {args.task}", f"--seeds {seeds}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--variants {' '.join(args.variants)}"] if args.variants else []
    parts += [f"--threads {args.threads}"] + (["--no-memory"] if args.no_memory else [])
    parts += [f"--steps {args.steps}"] if args.steps else []
    parts += ["--tiny"] if args.tiny else []
    return " ".join(parts)


def main(args: Any) -> int:
    """Run ``nlgraph compare`` from parsed arguments; 0 on success, 2 on a bad option."""
    seeds = args.seeds if args.seeds is not None else (2 if args.quick or args.tiny else 3)
    if seeds < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        print("nlgraph compare: --seeds, --threads and --steps must be >= 1", file=sys.stderr)
        return 2
    if optional("sklearn.datasets") is None:
        print(f"nlgraph compare: {missing('sklearn')}", file=sys.stderr)
        return 2
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    task_names = TASKS if args.task == "all" else (args.task,)
    try:
        doc = run(task_names, args.variants, seeds, preset, args.threads, not args.no_memory,
                  not args.no_progress, steps=args.steps)
    except ValueError as exc:
        print(f"nlgraph compare: {exc}", file=sys.stderr)
        return 2
    doc["command"] = _command(args, seeds)
    path = args.json or os.path.join(args.out, "compare.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {path}")
    fig_path = os.path.join(args.out, "compare.png")
    problem = figure(doc, fig_path)
    print(f"figure skipped: {problem}" if problem else f"wrote {fig_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--memory-server"]:
        sys.exit(_memory_server())
    sys.exit(main(build_parser().parse_args()))
