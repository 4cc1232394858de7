"""nlgraph.distributed.aggregate over spawned gloo process groups == the single-process op.

Each world (2, 3 and 4 ranks, uneven shards, one with an empty rank) is spawned once and runs every
case: every rank builds the same global float64 problem from one seed, passes its shard and compares
its rows of y and its slices of every gradient with the single-process op it computes itself. The
two sides sum the same terms in different groupings (per-shard partial sums merged by log-sum-exp or
added), so they agree to float64 rounding of sums of O(1) terms: rtol 1e-9 / atol 1e-10 leaves
orders of magnitude of room (N <= 40 terms, u = 1.1e-16).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nlgraph
from nlgraph import distributed as nd
from nlgraph import graph as G
from nlgraph.affinity import Concatenation, DotProduct, Gaussian, Softmax

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

RTOL, ATOL = 1e-9, 1e-10
METHODS = ("ring", "allgather")
H, W, D, E = 8, 5, 4, 3  # a grid of 8 x 5 = 40 nodes; shards are whole rows for the window graphs


def _affinities():
    gen = torch.Generator().manual_seed(7)
    return {
        "softmax": Softmax(),
        "gaussian": Gaussian(1.5),
        "gaussian_unnormalised": Gaussian(2.0, normalize=False),
        "dot": DotProduct(0.3),
        "concat": Concatenation(torch.randn(2 * D, generator=gen, dtype=torch.float64) * 0.3),
    }


def _graphs(n):
    gen = torch.Generator().manual_seed(11)
    bool_mask = torch.rand(2, 1, n, n, generator=gen) > 0.4
    bool_mask[..., 0] = True
    float_mask = torch.where(torch.rand(n, n, generator=gen) > 0.3,
                             torch.randn(n, n, generator=gen, dtype=torch.float64), torch.tensor(-torch.inf,
                                                                                                   dtype=torch.float64))
    return {
        "complete": None,
        "bool_mask": G.Mask(bool_mask),
        "float_mask": G.Mask(float_mask),
        "exclude_self": G.ExcludeSelf(),
        "window_1d": G.LocalWindow((n,), 3),
        "window_2d": G.LocalWindow((H, W), 1),
        "criss_cross": G.CrissCross((H, W)),
    }


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = H * W
    q = torch.randn(2, 3, n, D, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, n, E, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, 3, n, E, generator=gen, dtype=torch.float64)
    return q, k, v, dy


def _check(name, got, want, errors):
    try:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    except AssertionError as err:
        errors.append(str(err)[:400])


def _run_cases(rank, world, rows, errors, traffic):
    sizes = [r * W for r in rows]
    sl = nd.shard_slice(sizes, rank)
    q, k, v, dy = _problem()
    for aname, aff in _affinities().items():
        for gname, graph in _graphs(H * W).items():
            ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
            y_ref = nlgraph.aggregate(*ref_in, aff, graph)
            y_ref.backward(dy)
            for method in METHODS:
                tag = f"rank {rank}/{world} {aname} x {gname} [{method}]"
                mine = [t[..., sl, :].clone().requires_grad_(True) for t in (q, k, v)]
                try:
                    y = nd.aggregate(*mine, aff, graph, method=method)
                    y.backward(dy[..., sl, :])
                except Exception:  # noqa: BLE001 - reported to the parent test
                    errors.append(f"{tag}: {traceback.format_exc()[-600:]}")
                    continue
                _check(f"{tag} y", y, y_ref[..., sl, :], errors)
                for nm, t, r in zip("qkv", mine, ref_in, strict=True):
                    _check(f"{tag} d{nm}", t.grad, r.grad[..., sl, :], errors)
                traffic[f"{aname}|{gname}|{method}"] = nd.last_exchange().bytes_sent


MODULE_ROWS = {2: [4, 4], 3: [2, 2, 4], 4: [2, 2, 2, 2]}  # even shards: sub_sample pools 2 x 2


def _sync_grads(module):
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def _run_modules(rank, world, errors):
    """NonLocal2d, DenseCRF and MultiheadAttention with process_group == the same module on one process."""
    from attention import MultiheadAttention

    group = dist.group.WORLD
    rows = MODULE_ROWS[world]
    sl = nd.shard_slice(rows, rank)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, 4, generator=gen, dtype=torch.float64)
    dz = torch.randn(2, 6, 8, 4, generator=gen, dtype=torch.float64)
    for mode in ("embedded_gaussian", "dot_product"):
        torch.manual_seed(0)
        block = nlgraph.NonLocal2d(6, 3, mode=mode).double()
        torch.nn.init.normal_(block.W[1].weight)  # a non-identity block
        block.eval()
        ref_x = x.clone().requires_grad_(True)
        block(ref_x).backward(dz)
        want = {n: p.grad.clone() for n, p in block.named_parameters()}
        block.zero_grad()
        block.process_group, block.distributed_method = group, METHODS[-1]
        mine = x[:, :, sl].clone().requires_grad_(True)
        try:
            z = block(mine)
            z.backward(dz[:, :, sl])
            _sync_grads(block)
        except Exception:  # noqa: BLE001
            errors.append(f"rank {rank} NonLocal2d {mode}: {traceback.format_exc()[-600:]}")
            continue
        _check(f"rank {rank} NonLocal2d {mode} dx", mine.grad, ref_x.grad[:, :, sl], errors)
        for n, p in block.named_parameters():
            _check(f"rank {rank} NonLocal2d {mode} d{n}", p.grad, want[n], errors)

    from crf import DenseCRF

    image = torch.rand(2, 3, 8, 5, generator=gen, dtype=torch.float64)
    unary = torch.randn(2, 3, 8, 5, generator=gen, dtype=torch.float64)
    dq = torch.randn(2, 3, 8, 5, generator=gen, dtype=torch.float64)
    crf = DenseCRF(3, theta_alpha=3.0, theta_beta=0.4, theta_gamma=1.5, num_iterations=2, trainable=True)
    crf = crf.double()
    crf.backend = "chunked"
    ref_u = unary.clone().requires_grad_(True)
    crf(ref_u, image).backward(dq)
    want = {n: p.grad.clone() for n, p in crf.named_parameters()}
    crf.zero_grad()
    crf.process_group, crf.distributed_method = group, METHODS[0]
    mine = unary[:, :, sl].clone().requires_grad_(True)
    try:
        crf(mine, image[:, :, sl]).backward(dq[:, :, sl])
        _sync_grads(crf)
        _check(f"rank {rank} DenseCRF dunary", mine.grad, ref_u.grad[:, :, sl], errors)
        for n, p in crf.named_parameters():
            _check(f"rank {rank} DenseCRF d{n}", p.grad, want[n], errors)
    except Exception:  # noqa: BLE001
        errors.append(f"rank {rank} DenseCRF: {traceback.format_exc()[-600:]}")

    seq = [3 * r for r in rows]  # 3 tokens per row share
    ssl = nd.shard_slice(seq, rank)
    length = sum(seq)
    torch.manual_seed(1)
    mha = MultiheadAttention(8, 2, batch_first=True).double()
    tok = torch.randn(2, length, 8, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, length, 8, generator=gen, dtype=torch.float64)
    kpm = torch.zeros(2, length, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    cases = (("padding", {"key_padding_mask": kpm}), ("causal", {"attn_mask": causal, "is_causal": True}))
    for name, kw in cases:
        mha.process_group = None
        mha.zero_grad()
        ref = tok.clone().requires_grad_(True)
        mha(ref, ref, ref, need_weights=False, **kw)[0].backward(dy)
        want = {n: p.grad.clone() for n, p in mha.named_parameters()}
        mha.zero_grad()
        mha.process_group, mha.distributed_method = group, METHODS[0]
        mine = tok[:, ssl].clone().requires_grad_(True)
        try:
            out = mha(mine, mine, mine, need_weights=False, **kw)[0]
            out.backward(dy[:, ssl])
            _sync_grads(mha)
        except Exception:  # noqa: BLE001
            errors.append(f"rank {rank} MHA {name}: {traceback.format_exc()[-600:]}")
            continue
        _check(f"rank {rank} MHA {name} dx", mine.grad, ref.grad[:, ssl], errors)
        for n, p in mha.named_parameters():
            _check(f"rank {rank} MHA {name} d{n}", p.grad, want[n], errors)


def _run_properties(rank, world, errors):
    """Hypothesis over shard sizes (empty and uneven, queries and keys split independently), broadcast
    batch shapes, features, affinities, graphs and both methods: every rank draws the same examples
    (derandomised, generation phase only, the body never raises), so they issue the same collectives."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    affinities = _affinities()
    ran = []
    sizes = st.lists(st.integers(0, 4), min_size=world, max_size=world).filter(lambda s: sum(s) > 0)

    @settings(max_examples=12, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(n_rows=sizes, m_rows=sizes, d=st.integers(1, 3), e=st.integers(1, 3),
           lead=st.sampled_from([((), ()), ((2,), (2,)), ((2, 1), (1, 3)), ((1, 2), (2,))]),
           aname=st.sampled_from(sorted(affinities)),
           gname=st.sampled_from(["complete", "mask", "exclude_self", "window_1d"]),
           method=st.sampled_from(METHODS), seed=st.integers(0, 2**16))
    def prop(n_rows, m_rows, d, e, lead, aname, gname, method, seed):
        if gname in ("exclude_self", "window_1d"):
            m_rows = n_rows  # self-graphs: one node set
        n, m = sum(n_rows), sum(m_rows)
        gen = torch.Generator().manual_seed(seed)
        ql, kl = lead
        aff = affinities[aname]
        if aname == "concat":
            aff = Concatenation(torch.randn(2 * d, generator=gen, dtype=torch.float64) * 0.3)
        q = torch.randn(*ql, n, d, generator=gen, dtype=torch.float64)
        k = torch.randn(*kl, m, d, generator=gen, dtype=torch.float64)
        v = torch.randn(*kl, m, e, generator=gen, dtype=torch.float64)
        graph = {"complete": None, "mask": G.Mask(torch.rand(n, m, generator=gen) > 0.3),
                 "exclude_self": G.ExcludeSelf(), "window_1d": G.LocalWindow((n,), 1)}[gname]
        ran.append(1)
        tag = f"rank {rank}/{world} property n={n_rows} m={m_rows} lead={lead} {aname} x {gname} [{method}]"
        ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
        try:
            y_ref = nlgraph.aggregate(*ref, aff, graph)
            dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
            y_ref.backward(dy)
            sq, sk = nd.shard_slice(n_rows, rank), nd.shard_slice(m_rows, rank)
            mine = [q[..., sq, :].clone().requires_grad_(True), k[..., sk, :].clone().requires_grad_(True),
                    v[..., sk, :].clone().requires_grad_(True)]
            y = nd.aggregate(*mine, aff, graph, method=method)
            y.backward(dy[..., sq, :])
        except Exception:  # noqa: BLE001 - never raise: the ranks must keep drawing the same examples
            errors.append(f"{tag}: {traceback.format_exc()[-600:]}")
            return
        _check(f"{tag} y", y, y_ref[..., sq, :], errors)
        for nm, t, r, s in zip("qkv", mine, ref, (sq, sk, sk), strict=True):
            _check(f"{tag} d{nm}", t.grad, r.grad[..., s, :], errors)

    prop()
    if len(ran) < 12:
        errors.append(f"rank {rank}: the property ran {len(ran)} of 12 examples")


def _run_ring_memory_and_params(rank, world, rows, errors):
    """The ring keeps only this rank's shards for backward (memory O(local), counted with
    saved_tensors_hooks), and tensors inside the affinity and the graph (a Concatenation's weight, a
    float mask bias) get their gradients: each rank's contribution, summed over ranks == one process."""
    sizes = [r * W for r in rows]
    sl = nd.shard_slice(sizes, rank)
    q, k, v, dy = _problem(seed=5)
    gen = torch.Generator().manual_seed(9)
    weight = (torch.randn(2 * D, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    bias = torch.randn(H * W, H * W, generator=gen, dtype=torch.float64).requires_grad_(True)
    for aff, graph, name in ((Concatenation(weight), None, "concat weight"),
                             (Softmax(), G.Mask(bias), "mask bias")):
        leaf = weight if graph is None else bias
        leaf.grad = None
        nlgraph.aggregate(q, k, v, aff, graph).backward(dy)
        want, leaf.grad = leaf.grad.clone(), None
        mine = [t[..., sl, :].clone().requires_grad_(True) for t in (q, k, v)]
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = nd.aggregate(*mine, aff, graph, method="ring")
            y.backward(dy[..., sl, :])
            got = leaf.grad.clone()
            dist.all_reduce(got)
        except Exception:  # noqa: BLE001
            errors.append(f"rank {rank} ring {name}: {traceback.format_exc()[-600:]}")
            continue
        _check(f"rank {rank} ring d({name})", got, want, errors)
        local = sum(t.numel() for t in mine) + 2 * y.numel()  # q, k, v shards, y and lse (<= y)
        if sum(saved) > local:
            errors.append(f"rank {rank} ring {name}: saved {sum(saved)} elements for backward, more than "
                          f"the local shards' {local}")


def _worker(rank, world, rows, init_file, out_dir):
    errors, traffic = [], {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        torch.set_num_threads(1)
        _run_cases(rank, world, rows, errors, traffic)
        _run_modules(rank, world, errors)
        _run_properties(rank, world, errors)
        _run_ring_memory_and_params(rank, world, rows, errors)
        # ranks that disagree on the problem get a ValueError on every rank, not a hang
        q, k, v, _ = _problem()
        d = D if rank else D - 1
        try:
            nd.aggregate(q[..., :W, :d], k[..., :W, :d], v[..., :W, :])
            errors.append(f"rank {rank}: disagreeing shapes did not raise")
        except ValueError as err:
            if "disagree" not in str(err):
                errors.append(f"rank {rank}: unexpected message {err}")
        dist.barrier()
    except Exception:  # noqa: BLE001
        errors.append(f"rank {rank}: {traceback.format_exc()[-800:]}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"errors": errors, "traffic": traffic}, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(rows):
    world = len(rows)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, rows, os.path.join(tmp, "init"), tmp), nprocs=world,
                           join=True, start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as fh:
                results.append(json.load(fh))
    return results


# shard sizes in grid rows (8 rows of 5 nodes): uneven, and one world with an empty rank
WORLDS = {2: [3, 5], 3: [2, 0, 6], 4: [1, 2, 3, 2]}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_sharded_equals_single_process(world):
    results = _spawn(WORLDS[world])
    errors = [e for r in results for e in r["errors"]]
    assert not errors, "\n".join(errors[:10]) + f"\n... {len(errors)} mismatches in all"
    if world == 4:
        # a window of radius 1 row: each rank sends at most one row to each neighbour (key + value)
        row_bytes = 2 * 3 * W * (D + E) * 8
        for r in results:
            assert r["traffic"]["softmax|window_2d|allgather"] <= 2 * row_bytes
            assert r["traffic"]["softmax|window_2d|ring"] <= 2 * row_bytes
        complete = max(r["traffic"]["softmax|complete|allgather"] for r in results)
        assert complete > 2 * row_bytes  # the complete graph needs every shard


def test_errors_without_process_group():
    q = torch.randn(4, 2)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        nd.aggregate(q, q, q)
    with pytest.raises(ValueError, match="method"):
        nd.aggregate(q, q, q, method="ulysses")


def test_all_reduce_sum_rejects_non_tensors():
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        nd.all_reduce_sum([1.0, 2.0])


def test_shard_helpers():
    assert nd.shard_sizes(10, 3) == [4, 3, 3]
    assert nd.shard_sizes(0, 2) == [0, 0]
    assert nd.shard_slice([4, 3, 3], 2) == slice(7, 10)
    with pytest.raises(ValueError):
        nd.shard_sizes(3, 0)
