"""Triton kernels of the ``triton`` backend (imported only when that backend runs).

Every kernel computes its score tiles with :func:`scores` -- the canonical form
``s_ij = q'_i . k'_j + r_i + c_j`` (feature dimension tiled), flat top, exclude-self, the local
window from grid coordinates, dense bool / float masks -- so the forward and both backward
kernels see the same graph. Layouts: q' (B, N, D), k' (B, M, D), v (B, M, E), row (B, N),
col (B, M), any strides; gradients, the log-sum-exp and dO . O are written fp32 contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def dot_nt(A, B, b, offs_n, offs_m, n_ok, m_ok, sab, san, sak, sbb, sbm, sbk, K,
           DOT_FP32: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """A[b, offs_n, :] . B[b, offs_m, :]^T in fp32, the inner dimension K tiled by BLOCK_K
    (q'.k'^T, dO.V^T)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(A + b * sab + offs_n[:, None] * san + kk[None, :] * sak,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(B + b * sbb + offs_m[:, None] * sbm + kk[None, :] * sbk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc += tl.dot(x, tl.trans(y), input_precision=PREC, out_dtype=tl.float32)
    return acc


@triton.jit
def mma(a, b, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    """a . b in fp32 for fp32 weights ``a`` and loaded operands ``b``: both in fp32 (IEEE or tf32 by PREC)
    when DOT_FP32, else ``a`` rounded to ``b``'s (fp16/bf16) dtype for the tensor cores."""
    if DOT_FP32:
        out = tl.dot(a, b.to(tl.float32), input_precision=PREC, out_dtype=tl.float32)
    else:
        out = tl.dot(a.to(b.dtype), b, input_precision=PREC, out_dtype=tl.float32)
    return out


@triton.jit
def scores(Q, K, R, C, MK, BI, CO, b, offs_n, offs_m, n_ok, m_ok,
           sqb, sqn, sqd, skb, skm, skd, srb, srn, scb, scm, smb1, smb2, smn, smm, sbb1, sbb2, sbn, sbm,
           D, B2, clamp, floor, WP,
           HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_FLOOR: tl.constexpr,
           EXCL_SELF: tl.constexpr,
           HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_DIMS: tl.constexpr, WIN_ANY: tl.constexpr,
           DOT_FP32: tl.constexpr,
           PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (BLOCK_N, BLOCK_M) score tile, non-edges at -inf; ``live``: where d s / d lin = 1 (not flat)."""
    s = dot_nt(Q, K, b, offs_n, offs_m, n_ok, m_ok, sqb, sqn, sqd, skb, skm, skd, D,
               DOT_FP32, PREC, BLOCK_N, BLOCK_M, BLOCK_D)
    if HAS_ROW:
        s += tl.load(R + b * srb + offs_n * srn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_COL:
        s += tl.load(C + b * scb + offs_m * scm, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    valid = n_ok[:, None] & m_ok[None, :]
    live = valid
    if HAS_CLAMP:  # flat top: min(s + clamp, 0); no gradient where capped
        live = live & (s + clamp < 0.0)
        s = tl.minimum(s + clamp, 0.0)
    if HAS_FLOOR:  # cut-off: no weight below -floor (the pair is a non-edge)
        valid = valid & (s >= -floor)
    if EXCL_SELF:
        valid = valid & (offs_n[:, None] != offs_m[None, :])
    if WIN_DIMS > 0:  # local window from the nodes' grid coordinates (int32, node order)
        # the axes' tests combine by AND (a window) or, with WIN_ANY, by OR (criss-cross: the same row
        # or the same column, each axis' test a window of reach 0)
        if WIN_ANY:
            grid_ok = (offs_n[:, None] < 0) & (offs_m[None, :] < 0)  # no edge yet (OR from here)
        else:
            grid_ok = valid
        for ax in tl.static_range(WIN_DIMS):
            # the axis' window (LocalWindow._axis_edge): WP[ax] = (left, right, dilation t, kernel k,
            # shifted, extent); positions in units of t within the query's dilation group
            left = tl.load(WP + ax * 6)
            right = tl.load(WP + ax * 6 + 1)
            t = tl.load(WP + ax * 6 + 2)
            k = tl.load(WP + ax * 6 + 3)
            shifted = tl.load(WP + ax * 6 + 4)
            extent = tl.load(WP + ax * 6 + 5)
            cq = tl.load(CO + offs_n * WIN_DIMS + ax, mask=n_ok, other=0)
            ck = tl.load(CO + offs_m * WIN_DIMS + ax, mask=m_ok, other=0)
            aq = cq // t
            ak = ck // t
            diff = ak[None, :] - aq[:, None]
            ok = (diff >= -left) & (diff <= right)
            if shifted != 0:  # NATTEN's window: k keys from clamp(a' - k // 2, 0, L' - k)
                length = (extent - cq % t + t - 1) // t  # L' of the query's dilation group
                start = tl.minimum(tl.maximum(aq - k // 2, 0), length - k)
                ok = (ak[None, :] >= start[:, None]) & (ak[None, :] < start[:, None] + k)
            ok = ok & ((cq % t)[:, None] == (ck % t)[None, :])
            if WIN_ANY:
                grid_ok = grid_ok | ok
            else:
                grid_ok = grid_ok & ok
        valid = valid & grid_ok
    # dense masks are read through two batch strides (e.g. a (B, 1, 1, M) padding mask under
    # (B, H) leading dims) and per-row/column strides that may be 0 (broadcast)
    b1 = b // B2
    b2 = b % B2
    if HAS_MASK:
        mk = tl.load(MK + b1 * smb1 + b2 * smb2 + offs_n[:, None] * smn + offs_m[None, :] * smm,
                     mask=valid, other=0)
        valid = valid & (mk != 0)
    if HAS_BIAS:
        s += tl.load(BI + b1 * sbb1 + b2 * sbb2 + offs_n[:, None] * sbn + offs_m[None, :] * sbm,
                     mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, s, float("-inf")), live & valid


@triton.jit
def fwd(Q, K, V, R, C, MK, BI, CO, PL, O, L,  # noqa: E741  (O: the output, as in FlashAttention)
        sqb, sqn, sqd, skb, skm, skd, svb, svm, sve, srb, srn, scb, scm, sob, son, soe, slb, sln,
        smb1, smb2, smn, smm, sbb1, sbb2, sbn, sbm,
        N, M, D, E, B2, clamp, floor, WP, n_kblocks,
        HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_FLOOR: tl.constexpr,
        EXCL_SELF: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_DIMS: tl.constexpr, WIN_ANY: tl.constexpr,
        HAS_PLAN: tl.constexpr,
        NORM_SUM: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in 64 bits
    pid_e = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n_ok = offs_n < N
    e_ok = offs_e < E
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for j0 in range(0, M, BLOCK_M):
      take = True
      if HAS_PLAN:  # block-sparse graph: skip key blocks the plan rules out
          take = tl.load(PL + pid_n * n_kblocks + j0 // BLOCK_M) != 0
      if take:
        offs_m = j0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        s, live = scores(Q, K, R, C, MK, BI, CO, b, offs_n, offs_m, n_ok, m_ok,
                         sqb, sqn, sqd, skb, skm, skd, srb, srn, scb, scm, smb1, smb2, smn, smm,
                         sbb1, sbb2, sbn, sbm, D, B2, clamp, floor, WP,
                         HAS_ROW, HAS_COL, HAS_CLAMP, HAS_FLOOR, EXCL_SELF, HAS_MASK, HAS_BIAS, WIN_DIMS,
                         WIN_ANY, DOT_FP32,
                         PREC, BLOCK_N, BLOCK_M, BLOCK_D)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + offs_m[:, None] * svm + offs_e[None, :] * sve,
                    mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + mma(p, v, DOT_FP32, PREC)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    if NORM_SUM:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        stat = tl.where(l_i > 0, m_safe + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    else:  # C = 1: log C = 0 where the query has a neighbour, -inf where it has none
        out = acc * tl.exp(m_safe)[:, None]
        stat = tl.where(m_i == float("-inf"), float("-inf"), 0.0)
    tl.store(O + b * sob + offs_n[:, None] * son + offs_e[None, :] * soe, out,
             mask=n_ok[:, None] & e_ok[None, :])
    if pid_e == 0:
        tl.store(L + b * slb + offs_n * sln, stat, mask=n_ok)


@triton.jit
def bwd_kv(Q, K, V, R, C, MK, BI, CO, PL, DO, L, DL, DK, DV, DC,
           sqb, sqn, sqd, skb, skm, skd, svb, svm, sve, srb, srn, scb, scm, sdb, sdn, sde,
           smb1, smb2, smn, smm, sbb1, sbb2, sbn, sbm,
           N, M, D, E, B2, clamp, floor, WP, n_kblocks, n_dchunks, n_echunks, n_cchunks,
           HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_FLOOR: tl.constexpr,
           EXCL_SELF: tl.constexpr,
           HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_DIMS: tl.constexpr, WIN_ANY: tl.constexpr,
           HAS_PLAN: tl.constexpr,
           NORM_SUM: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """A block of keys: dV = P^T dO and dK = dS^T Q for one feature / value chunk, dcol = sum_i dS."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in 64 bits
    chunk = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    dd = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    ee = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = ee < E
    do_k = chunk < n_dchunks  # 0 chunks when not needed
    do_v = chunk < n_echunks
    do_c = chunk < n_cchunks  # 1 or 0
    acc_k = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    acc_c = tl.zeros([BLOCK_M], tl.float32)
    for i0 in range(0, N, BLOCK_N):
      take = True
      if HAS_PLAN:
          take = tl.load(PL + (i0 // BLOCK_N) * n_kblocks + pid_m) != 0
      if take:
        offs_n = i0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        s, live = scores(Q, K, R, C, MK, BI, CO, b, offs_n, offs_m, n_ok, m_ok,
                         sqb, sqn, sqd, skb, skm, skd, srb, srn, scb, scm, smb1, smb2, smn, smm,
                         sbb1, sbb2, sbn, sbm, D, B2, clamp, floor, WP,
                         HAS_ROW, HAS_COL, HAS_CLAMP, HAS_FLOOR, EXCL_SELF, HAS_MASK, HAS_BIAS, WIN_DIMS,
                         WIN_ANY, DOT_FP32,
                         PREC, BLOCK_N, BLOCK_M, BLOCK_D)
        base = tl.load(L + b * N + offs_n, mask=n_ok, other=0.0)
        if NORM_SUM:  # P = exp(s - lse); C = 1: P = exp(s)
            p = tl.exp(s - tl.where(base == float("-inf"), 0.0, base)[:, None])
        else:
            p = tl.exp(s)
        if do_v:
            do = tl.load(DO + b * sdb + offs_n[:, None] * sdn + ee[None, :] * sde,
                         mask=n_ok[:, None] & e_ok[None, :], other=0.0)
            acc_v += mma(tl.trans(p), do, DOT_FP32, PREC)
        if do_k or do_c:
            dp = dot_nt(DO, V, b, offs_n, offs_m, n_ok, m_ok, sdb, sdn, sde, svb, svm, sve, E,
                        DOT_FP32, PREC, BLOCK_N, BLOCK_M, BLOCK_E)
            if NORM_SUM:
                dp -= tl.load(DL + b * N + offs_n, mask=n_ok, other=0.0)[:, None]
            ds = tl.where(live, p * dp, 0.0)
            if do_c:
                acc_c += tl.sum(ds, 0)
            if do_k:
                q = tl.load(Q + b * sqb + offs_n[:, None] * sqn + dd[None, :] * sqd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc_k += mma(tl.trans(ds), q, DOT_FP32, PREC)
    if do_k:
        tl.store(DK + b * M * D + offs_m[:, None] * D + dd[None, :], acc_k,
                 mask=m_ok[:, None] & d_ok[None, :])
    if do_v:
        tl.store(DV + b * M * E + offs_m[:, None] * E + ee[None, :], acc_v,
                 mask=m_ok[:, None] & e_ok[None, :])
    if do_c:
        tl.store(DC + b * M + offs_m, acc_c, mask=m_ok)


@triton.jit
def bwd_q(Q, K, V, R, C, MK, BI, CO, PL, DO, L, DL, DQ, DR,
          sqb, sqn, sqd, skb, skm, skd, svb, svm, sve, srb, srn, scb, scm, sdb, sdn, sde,
          smb1, smb2, smn, smm, sbb1, sbb2, sbn, sbm,
          N, M, D, E, B2, clamp, floor, WP, n_kblocks, n_qchunks, n_rchunks,
          HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_FLOOR: tl.constexpr,
          EXCL_SELF: tl.constexpr,
          HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_DIMS: tl.constexpr, WIN_ANY: tl.constexpr,
          HAS_PLAN: tl.constexpr,
          NORM_SUM: tl.constexpr, DOT_FP32: tl.constexpr,
          PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_E: tl.constexpr):
    """A block of queries: dQ = dS K for one feature chunk, drow = sum_j dS."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in 64 bits
    chunk = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    dd = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    do_q = chunk < n_qchunks
    do_r = chunk < n_rchunks
    base = tl.load(L + b * N + offs_n, mask=n_ok, other=0.0)
    base = tl.where(base == float("-inf"), 0.0, base)
    dsum = tl.load(DL + b * N + offs_n, mask=n_ok, other=0.0)
    acc_q = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_r = tl.zeros([BLOCK_N], tl.float32)
    for j0 in range(0, M, BLOCK_M):
      take = True
      if HAS_PLAN:
          take = tl.load(PL + pid_n * n_kblocks + j0 // BLOCK_M) != 0
      if take:
        offs_m = j0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        s, live = scores(Q, K, R, C, MK, BI, CO, b, offs_n, offs_m, n_ok, m_ok,
                         sqb, sqn, sqd, skb, skm, skd, srb, srn, scb, scm, smb1, smb2, smn, smm,
                         sbb1, sbb2, sbn, sbm, D, B2, clamp, floor, WP,
                         HAS_ROW, HAS_COL, HAS_CLAMP, HAS_FLOOR, EXCL_SELF, HAS_MASK, HAS_BIAS, WIN_DIMS,
                         WIN_ANY, DOT_FP32,
                         PREC, BLOCK_N, BLOCK_M, BLOCK_D)
        if NORM_SUM:
            p = tl.exp(s - base[:, None])
        else:
            p = tl.exp(s)
        dp = dot_nt(DO, V, b, offs_n, offs_m, n_ok, m_ok, sdb, sdn, sde, svb, svm, sve, E,
                    DOT_FP32, PREC, BLOCK_N, BLOCK_M, BLOCK_E)
        if NORM_SUM:
            dp -= dsum[:, None]
        ds = tl.where(live, p * dp, 0.0)
        if do_r:
            acc_r += tl.sum(ds, 1)
        if do_q:
            k = tl.load(K + b * skb + offs_m[:, None] * skm + dd[None, :] * skd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            acc_q += mma(ds, k, DOT_FP32, PREC)
    if do_q:
        tl.store(DQ + b * N * D + offs_n[:, None] * D + dd[None, :], acc_q,
                 mask=n_ok[:, None] & d_ok[None, :])
    if do_r:
        tl.store(DR + b * N + offs_n, acc_r, mask=n_ok)
