"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90, no GPU needed.

    python -m mio_kernels.kernels.aot        # prints one JSON line per (kernel, arch, dtype)

Uses the shipped GPU launch configuration (config.py) at H = 4096 and reports, per build, the
shared memory and whether the PTX uses tensor-core instructions (mma.sync on sm_80, wgmma on
sm_90). Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler's builtins).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mio_kernels.kernels.config import LaunchConfig, gpu_backward_config, gpu_forward_config
from mio_kernels.kernels.logprob_backward import logprob_backward_kernel
from mio_kernels.kernels.logprob_forward import logprob_forward_kernel

HIDDEN = 4096
FORWARD = gpu_forward_config(HIDDEN)
BACKWARD = gpu_backward_config(HIDDEN)
TENSOR_CORE_OP = {80: "mma.sync", 90: "wgmma"}


SCALARS = {"scale": "fp32", "cap": "fp32"}


def _signature(kernel, pointers, constexprs):
    types = {**SCALARS, **pointers}
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}


def compile_kernel(kernel, pointers, constexprs, cfg: LaunchConfig, cap: int):
    src = ASTSource(kernel, _signature(kernel, pointers, constexprs),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def builds():
    """(name, kernel, pointer types, constexprs, config) for every kernel x dtype."""
    for dtype in ("bf16", "fp16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        io = {"H": f"*{dtype}", "W": f"*{dtype}", "Y": "*i64", "B": f"*{dtype}"}
        yield ("forward", dtype, logprob_forward_kernel,
               {**io, "MAX_PART": "*fp32", "SUMEXP_PART": "*fp32", "TARGET_PART": "*fp32", "MOMENT_PART": "*fp32"},
               dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, UPCAST=False, DOT_PRECISION=precision,
                    BLOCK_N=FORWARD.block_n, BLOCK_V=FORWARD.block_v, BLOCK_D=FORWARD.block_d), FORWARD)
        yield ("backward", dtype, logprob_backward_kernel,
               {**io, "ROW_MAX": "*fp32", "LOG_SUMEXP": "*fp32", "G": "*fp32", "GE": "*fp32", "MU": "*fp32",
                "DH": "*fp32", "DW": "*fp32", "DB": "*fp32"},
               dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, COMPUTE_DH=True, COMPUTE_DW=True, UPCAST=False, DOT_PRECISION=precision,
                    BLOCK_N=BACKWARD.block_n, BLOCK_V=BACKWARD.block_v, BLOCK_D=BACKWARD.block_d,
                    GROUP_N=BACKWARD.group_n), BACKWARD)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter cannot compile")
    for name, dtype, kernel, pointers, constexprs, cfg in builds():
        for cap in (80, 90):
            compiled = compile_kernel(kernel, pointers, constexprs, cfg, cap)
            ptx = compiled.asm["ptx"]
            print(json.dumps(dict(kernel=name, arch=f"sm_{cap}", dtype=dtype, shared_bytes=compiled.metadata.shared,
                                  cubin_bytes=len(compiled.asm["cubin"]), tensor_cores=TENSOR_CORE_OP[cap] in ptx,
                                  config=asdict(cfg))), flush=True)


if __name__ == "__main__":
    main()
