"""Compile one attention kernel for the H100 (sm_90a) without a GPU and print what ptxas says of it.

Run as a script, outside Triton's interpreter (the test that uses it starts it in a subprocess):

    python tests/ptxas_report.py fwd|bwd CAUSAL

It builds the kernel as the JIT would for B2 H16 N8192 D128 bf16 contiguous inputs read through TMA
(every integer argument divisible by 16 marked so, unit strides folded to constants), runs the ptxas
that ships with Triton on the PTX, and prints one JSON line: whether ptxas serialised the kernel's
wgmma instructions (its advisory C7515), and its register count.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

import rbf_lite.kernels.rbf_attention as ra


def compile_like_jit(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """PTX for `kernel`, specialised on `args` the way Triton's JIT specialises a launch."""
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name], constants[(i,)] = "constexpr", constexprs[param.name]
            continue
        value = args[param.name]
        if type(value) is int and value == 1:
            signature[param.name], constants[(i,)] = "constexpr", 1
        elif type(value) is int:
            signature[param.name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(value) is float:
            signature[param.name] = "fp32"
        else:
            signature[param.name] = mangle_type(value, False)
            if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


def kernel_build(direction: str, causal: bool):
    """Tiles at D = 128 without a register cap: forward 128 x 128 (8 warps, 3 stages), backward 64 x 64
    (4 warps, 2 stages, the tuned one). The capped forward tiles are serialised for want of registers
    (advisory C7512, NOTES v15), a different cause that this check does not look for."""
    B, H, N, D = 2, 16, 8192, 128
    x = torch.empty(B, H, N, D, dtype=torch.bfloat16)
    rows = torch.empty(B, H, N)
    if direction == "fwd":
        keys = ra._descriptor(x, 128)
        values = (x, keys, keys, rows, x, rows, *x.stride() * 4, H, N, N, 0.3, 0.2)
        constexprs = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION="tf32", NORMALIZED=True, TMA=True,
                          INLINE_NORMS=False, BLOCK_M=128, BLOCK_N=128, MASKED_FIRST=False, STAGED=True)
        return ra._fwd_kernel, values, constexprs, 8, 3
    tiles = ra._descriptor(x, 64)
    values = (x, x, x, rows, x, x, rows, rows, x, x, x, tiles, tiles, tiles, tiles, *x.stride() * 7,
              H, N, N, 0.3, 0.2, 0.1)
    constexprs = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION="tf32", NORMALIZED=True, TMA=True, ATOMIC_DQ=False,
                      DELTA=ra.DELTA_LOAD.value, BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64,
                      STAGED=True)
    return ra._bwd_kernel, values, constexprs, 4, 2


def main(direction: str, causal: bool) -> dict:
    kernel, values, constexprs, num_warps, num_stages = kernel_build(direction, causal)
    args = dict(zip([p.name for p in kernel.params if not p.is_constexpr], values, strict=True))
    ptx = compile_like_jit(kernel, args, constexprs, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", "-o", str(Path(tmp) / "kernel.cubin"),
                                 str(source)], capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    return {"wgmma": ptx.count("wgmma.mma_async"), "serialised": "C7515" in result.stderr,
            "registers": int(registers.group(1)) if registers else None}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] == "1")))
