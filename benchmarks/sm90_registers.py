"""Registers, spills and shared memory of the training kernels on Hopper, without a GPU.

Compiles the kernels that `parallax_attn` would launch for one shape for sm_90a (CUDA
capability 9.0) on any machine, using Triton's compiler and the ptxas it ships, and prints
what ptxas reports, with the spill loads/stores in the SASS (all of them, and those inside the
MMA loops) and the wgmma instructions by shape and operand source (A from registers or shared
memory). Nothing runs: this answers "does this tiling spill, and where; does Triton's warp
specialization apply; does it fit in shared memory" before spending GPU time.

    python benchmarks/sm90_registers.py                       # B=4 H=16 L=4096 D=128, causal
    python benchmarks/sm90_registers.py --shape 1,16,8,4096,128 --dkv-config 32,128,4,3,1
    python benchmarks/sm90_registers.py --dump DIR     # also each kernel's SASS, PTX and TTGIR
    python benchmarks/sm90_registers.py --dkv-gluon    # the Gluon dk/dv kernel instead of Triton's
    python benchmarks/sm90_registers.py --fwd-gluon    # the Gluon forward instead of Triton's
    python benchmarks/sm90_registers.py --dq-gluon     # the Gluon dq/dr kernel instead of Triton's

Use the Triton version the GPU machine runs: register allocation changes between releases.
The launch path is taken over by patching triton.runtime.jit.JITFunction.run (Triton 3.x
internals), so another Triton may need this script adjusted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def _wgmma_forms(ptx: str) -> str:
    """The kernel's wgmma instructions by shape and where A comes from: "m64n32k16 RS x 8" means
    8 instructions of that shape reading A from registers (SS: both operands from shared memory)."""
    counts = {}
    for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)[^{]*\{[^}]*\},\s*(\{|%rd)", ptx):
        key = f"{m.group(1)} {'RS' if m.group(2) == '{' else 'SS'}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in sorted(counts.items())) or "-"


def _loop_spills(sass: str) -> tuple[int, int]:
    """LDL and STL inside the loops that issue warp-group MMAs (HGMMA): the spills paid on every
    tile, as opposed to those of the prologue and epilogue. A loop is a backward branch's address
    range; the shortest ranges holding an HGMMA are taken first and any range overlapping one
    already taken is left out (out-of-line barrier-wait stubs branch back across whole loops)."""
    instrs = [(int(m.group(1), 16), m.group(2))
              for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    ranges = []
    for addr, ins in instrs:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            body = [x for a, x in instrs if int(m.group(1), 16) <= a <= addr]
            if any("HGMMA" in x for x in body):
                ranges.append((int(m.group(1), 16), addr, body))
    inner = []
    for r in sorted(ranges, key=lambda r: r[1] - r[0]):
        if all(r[1] < o[0] or o[1] < r[0] for o in inner):
            inner.append(r)
    count = lambda op: sum(len(re.findall(rf"\b{op}\b", x)) for _, _, body in inner for x in body)  # noqa: E731
    return count("LDL"), count("STL")


def _install_compiler(results, dump_dir=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime import jit

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def compile_only(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = False
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        source = ASTSource
        if getattr(self, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource as source
        kernel = triton_compile(source(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        # the resource usage ptxas recorded in the cubin Triton built (STACK: the per-thread frame that
        # spilled registers live in)
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        try:
            report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                    text=True).stdout
            sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True).stdout
            if dump_dir:
                os.makedirs(dump_dir, exist_ok=True)
                for ext, text in (("sass", sass), ("ptx", kernel.asm["ptx"]), ("ttgir", kernel.asm["ttgir"])):
                    with open(os.path.join(dump_dir, f"{self.fn.__name__}.{ext}"), "w") as out:
                        out.write(text)
        finally:
            os.unlink(f.name)
        regs = re.search(r"REG:(\d+)", report)
        stack = re.search(r"STACK:(\d+)", report)
        results.append(dict(kernel=self.fn.__name__, warps=options.num_warps, stages=options.num_stages,
                            regs=int(regs.group(1)) if regs else None,
                            spill_bytes=int(stack.group(1)) if stack else None,
                            # local-memory loads and stores in the machine code: where the spills are paid
                            spill_ops=(len(re.findall(r"\bLDL\b", sass)), len(re.findall(r"\bSTL\b", sass))),
                            loop_spill_ops=_loop_spills(sass),
                            smem=kernel.metadata.shared,
                            warp_specialized=kernel.asm["ttgir"].count("ttg.warp_specialize") > 0,
                            maxnreg=options.maxnreg,
                            wgmma=_wgmma_forms(kernel.asm["ptx"])))
        return kernel

    jit.JITFunction.run = compile_only


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4,16,16,4096,128", help="B,Hq,Hkv,L,D")
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--dkv-config", default=None,
                    help="descriptor dk/dv kernel: BLOCK_M,BLOCK_N,warps,stages,warp_specialize (0/1)")
    ap.add_argument("--fwd-config", default=None, help="forward kernel: BLOCK_M,BLOCK_N,warps,stages")
    ap.add_argument("--dq-config", default=None, help="dq/dr kernel: BLOCK_M,BLOCK_N,warps,stages")
    ap.add_argument("--dkv-gluon", action="store_true",
                    help="the warp-specialized Gluon dk/dv kernel (ops/triton/dkv_gluon.py) instead of Triton's")
    ap.add_argument("--fwd-gluon", action="store_true",
                    help="the warp-specialized Gluon forward (ops/triton/fwd_gluon.py) instead of Triton's")
    ap.add_argument("--dq-gluon", action="store_true",
                    help="the warp-specialized Gluon dq/dr kernel (ops/triton/dq_gluon.py) instead of Triton's")
    ap.add_argument("--fused-bwd", choices=("fused", "fused_atomic"), default=None,
                    help="the fused Gluon backward (dk/dv and dq/dr in one kernel; PARALLAX_TRAIN_BWD's values)")
    ap.add_argument("--dump", default=None, metavar="DIR", help="also write each kernel's SASS, PTX and TTGIR there")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sm90_registers.py compiles for the GPU: unset TRITON_INTERPRET")

    from parallax_attention.ops.triton import train as tr
    results = []
    _install_compiler(results, args.dump)
    # take the GPU's decisions on a machine without one
    tr._use_tma = lambda meta, tensors, keys=None: (  # noqa: E731
        "fwd" in tr.TMA_KERNELS and not meta["VARLEN"] and (keys is None or keys >= tr.TMA_MIN_KEYS))
    tr._dkv_tma_usable = lambda tensors, d: d in (16, 32, 64, 128)  # noqa: E731
    tr._with_scratch = lambda launch: launch()  # noqa: E731
    from parallax_attention.ops.triton import _gluon
    _gluon.FAST_LAUNCH = False  # every launch must reach the compile-only run above
    if args.dkv_gluon:
        from parallax_attention.ops.triton import dkv_gluon
        dkv_gluon.usable = lambda q, k, d, tensors: d in dkv_gluon.CONFIG  # noqa: E731
        dkv_gluon.ENABLED = True
    if args.fused_bwd:
        from parallax_attention.ops.triton import dkv_gluon
        os.environ["PARALLAX_TRAIN_BWD"] = args.fused_bwd
        dkv_gluon.fused_usable = lambda q, k, d, tensors: d in dkv_gluon.FUSED_CONFIG  # noqa: E731
    from parallax_attention.ops.triton import fwd_gluon
    fwd_gluon.ENABLED = args.fwd_gluon
    if args.fwd_gluon:
        fwd_gluon.usable = lambda q, k, d, tensors: d in fwd_gluon.CONFIG and q.dim() == 4  # noqa: E731
    from parallax_attention.ops.triton import dq_gluon
    dq_gluon.ENABLED = args.dq_gluon
    if args.dq_gluon:
        dq_gluon.usable = lambda q, k, d, tensors: d in dq_gluon.CONFIG  # noqa: E731
    for name, cfg in (("fwd", args.fwd_config), ("dq", args.dq_config)):
        if cfg:
            tr.FIXED[name] = {**tr.FIXED[name], 128: tuple(int(x) for x in cfg.split(","))}
    if args.dkv_config:
        c = [int(x) for x in args.dkv_config.split(",")]
        tr.DKV_TMA_CONFIG = {k: (c[0], c[1], c[2], c[3], bool(c[4])) for k in tr.DKV_TMA_CONFIG}

    b, hq, hkv, L, d = (int(x) for x in args.shape.split(","))
    q = torch.empty(b, L, hq, d, dtype=torch.bfloat16)
    k = torch.empty(b, L, hkv, d, dtype=torch.bfloat16)
    lse = torch.empty(b, hq, L)
    causal = not args.non_causal
    tr.fwd(q, q, k, k, None, None, L, L, causal, d ** -0.5, -1, -1)
    tr.bwd(q, q, q, k, k, q, q, lse, lse, None, None, L, L, causal, d ** -0.5, -1, -1)

    print(f"sm_90a, shape B,Hq,Hkv,L,D = {args.shape}, causal={causal}")
    print("| kernel | warps | stages | registers | stack (spill) bytes | LDL / STL in SASS | LDL / STL in MMA loops | "
          "shared memory (bytes) | warp-specialized | wgmma in the PTX (shape, A from registers RS or shared memory SS) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kernel']} | {r['warps']} | {r['stages']} | {r['regs']} | {r['spill_bytes']} | "
              f"{r['spill_ops'][0]} / {r['spill_ops'][1]} | {r['loop_spill_ops'][0]} / {r['loop_spill_ops'][1]} | "
              f"{r['smem']} | {'yes' if r['warp_specialized'] else 'no'} | {r['wgmma']} |")


if __name__ == "__main__":
    main()
