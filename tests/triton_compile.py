"""Compile the triton backend's kernels to GPU machine code without a GPU (Triton's own compiler + ptxas).

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that the same
source compiles for real targets (TTIR -> TTGIR -> LLVM -> PTX -> cubin), which the interpreter
does not. Run by tests/test_triton.py in a subprocess (Triton binds interpreter mode at import);
by hand: ``python tests/triton_compile.py --arch 80 90 --dtype fp16 bf16 fp32``.
"""

from __future__ import annotations

import argparse
import os
import sys

_POINTERS = {"Q": "q", "K": "q", "V": "q", "R": "q", "C": "q", "BI": "q", "DO": "q", "MK": "i8", "PL": "i8",
             "CO": "i32", "WP": "i32", "O": "fp32", "L": "fp32", "DL": "fp32", "DK": "fp32", "DV": "fp32",
             "DC": "fp32", "DQ": "fp32", "DR": "fp32"}


def compile_all(archs, dtypes, block: int = 64) -> list[str]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nlgraph.backends.triton import kernels

    done = []
    for arch in archs:
        for dtype in dtypes:
            for fn in (kernels.fwd, kernels.bwd_kv, kernels.bwd_q):
                # every feature on: flat top, cut-off, exclude-self, 2-d window + plan (criss-cross's OR of
                # the axes in fp32), bool and float masks, row/col
                consts = dict(HAS_ROW=True, HAS_COL=True, HAS_CLAMP=True, HAS_FLOOR=True, EXCL_SELF=True,
                              HAS_MASK=True,
                              HAS_BIAS=True, WIN_DIMS=2,
                              WIN_ANY=dtype == "fp32", HAS_PLAN=True, NORM_SUM=True, DOT_FP32=False,
                              PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_N=block, BLOCK_M=block,
                              BLOCK_D=block, BLOCK_E=block)
                sig = {}
                for name in fn.arg_names:
                    if name in consts:
                        sig[name] = "constexpr"
                    elif name in _POINTERS:
                        sig[name] = "*" + (dtype if _POINTERS[name] == "q" else _POINTERS[name])
                    else:
                        sig[name] = "fp32" if name in ("clamp", "floor") else "i32"
                src = ASTSource(fn=fn, signature=sig,
                                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm.get("cubin"), f"no cubin for {fn.__name__} sm_{arch} {dtype}"
                done.append(f"{fn.__name__} sm_{arch} {dtype}")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=["fp16", "bf16", "fp32"])
    args = ap.parse_args(argv)
    for line in compile_all(args.arch, args.dtype):
        print("compiled", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
