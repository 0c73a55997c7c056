"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90, no GPU needed, with the
specialisation the GPU JIT would pick at a representative launch.

    python -m mio_kernels.kernels.aot        # prints one JSON line per (kernel, arch, dtype)

Specialisation. At launch the JIT turns every pointer whose address is 16-byte aligned and every
integer argument divisible by 16 into a `tt.divisibility = 16` hint, and every integer equal to 1
into a constant. The hints decide vectorised loads and software pipelining (shared memory changes
2-3x with them), so a build without them does not show what runs. We reproduce them with the JIT's
own binder (triton.runtime.jit.create_function_from_signature and JITFunction._pack_args, the
code path JITFunction.run takes before it compiles), fed a launch at N = 16384 tokens, V = 128256,
H = 4096 with the launchers' argument values and MockTensor pointers (address 0: aligned, like
every torch allocation). A launch with N (or V) not divisible by 16 compiles a second variant
without that one hint; strides, H and the forward's vocabulary slice (a multiple of BLOCK_V)
keep theirs.

Per build it reports the shared memory (compiled.metadata.shared), whether the PTX uses
tensor-core instructions (mma.sync on sm_80, wgmma on sm_90), and the registers and spills.
CompiledKernel.n_regs / n_spills cannot be used: triton fills them only when it loads the cubin
into a CUDA context (driver load_binary, which needs a GPU; n_spills there is the local memory
size / 4). The same numbers come from ptxas, which triton runs with -v at the cubin stage: its
report (TRITON_DUMP_PTXAS_LOG, here triton.knobs.nvidia.dump_ptxas_log) gives registers, spill
stores/loads and the stack frame, from which n_spills = stack frame / 4 as the driver would say.
Builds are forced past the cache (knobs.compilation.always_compile) so ptxas always runs.
Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler's builtins).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import asdict

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

from mio_kernels.kernels.config import LaunchConfig, gpu_backward_config, gpu_forward_config
from mio_kernels.kernels.logprob_backward import logprob_backward_kernel
from mio_kernels.kernels.logprob_forward import logprob_forward_kernel

TOKENS, VOCAB, HIDDEN = 16384, 128256, 4096
FORWARD = gpu_forward_config(HIDDEN)
BACKWARD = gpu_backward_config(HIDDEN)
TENSOR_CORE_OP = {80: "mma.sync", 90: "wgmma"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _launch_args(kernel_name: str, dtype: torch.dtype) -> dict:
    """The runtime (non-constexpr) arguments the launchers pass at the representative shape."""
    n, v, d = TOKENS, VOCAB, HIDDEN
    io_ = dict(H=MockTensor(dtype), W=MockTensor(dtype), Y=MockTensor(torch.int64), B=MockTensor(dtype))
    f32 = MockTensor(torch.float32)
    transform = dict(scale=1.0, cap=0.0)
    if kernel_name == "forward":
        v_per_split = triton.cdiv(triton.cdiv(v, FORWARD.v_splits), FORWARD.block_v) * FORWARD.block_v
        return dict(**io_, MAX_PART=f32, SUMEXP_PART=f32, TARGET_PART=f32, MOMENT_PART=f32, N=n, V=v, D=d,
                    stride_hn=d, stride_wv=d, ignore_index=-100, v_per_split=v_per_split, **transform)
    return dict(**io_, ROW_MAX=f32, LOG_SUMEXP=f32, G=f32, GE=f32, MU=f32, DH=f32, DW=f32, DB=f32,
                N=n, V=v, D=d, stride_hn=d, stride_wv=d, stride_dhn=d, stride_dwv=d, **transform)


def jit_source(kernel, backend, args: dict, constexprs: dict, cfg: LaunchConfig):
    """(ASTSource, options) exactly as JITFunction.run would build them for this launch."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bound, specialization, options = binder(**args, **constexprs, **launch)
    options, signature, constants, attrs = kernel._pack_args(backend, launch, bound, specialization, options)
    return triton.compiler.ASTSource(kernel, signature, constants, attrs), options


def _ptxas_usage(log: str) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v output (one kernel per build)."""
    def number(pattern):
        found = re.search(pattern, log)
        if found is None:
            raise RuntimeError(f"no '{pattern}' in the ptxas report:\n{log}")
        return int(found.group(1))
    stack = number(r"(\d+) bytes stack frame")
    return dict(n_regs=number(r"Used (\d+) registers"), spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"), stack_frame_bytes=stack, n_spills=stack // 4)


def compile_kernel(kernel, args: dict, constexprs: dict, cfg: LaunchConfig, cap: int):
    """-> (CompiledKernel, hinted argument names, ptxas usage dict)."""
    backend = make_backend(GPUTarget("cuda", cap, 32))
    src, options = jit_source(kernel, backend, args, constexprs, cfg)
    hinted = sorted(kernel.arg_names[path[0]] for path, attr in src.attrs.items() if ["tt.divisibility", 16] in attr)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=backend.target, options=options.__dict__)
    return compiled, hinted, _ptxas_usage(log.getvalue())


def builds():
    """(name, dtype, kernel, runtime args, constexprs, config) for every kernel x dtype."""
    for dtype, torch_dtype in DTYPES.items():
        precision = "ieee" if dtype == "fp32" else "tf32"
        yield ("forward", dtype, logprob_forward_kernel, _launch_args("forward", torch_dtype),
               dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, UPCAST=False, DOT_PRECISION=precision,
                    BLOCK_N=FORWARD.block_n, BLOCK_V=FORWARD.block_v, BLOCK_D=FORWARD.block_d), FORWARD)
        yield ("backward", dtype, logprob_backward_kernel, _launch_args("backward", torch_dtype),
               dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, COMPUTE_DH=True, COMPUTE_DW=True, UPCAST=False,
                    DOT_PRECISION=precision, BLOCK_N=BACKWARD.block_n, BLOCK_V=BACKWARD.block_v,
                    BLOCK_D=BACKWARD.block_d, GROUP_N=BACKWARD.group_n), BACKWARD)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter cannot compile")
    for name, dtype, kernel, args, constexprs, cfg in builds():
        for cap in (80, 90):
            compiled, hinted, usage = compile_kernel(kernel, args, constexprs, cfg, cap)
            print(json.dumps(dict(kernel=name, arch=f"sm_{cap}", dtype=dtype, shared_bytes=compiled.metadata.shared,
                                  **usage, cubin_bytes=len(compiled.asm["cubin"]),
                                  tensor_cores=TENSOR_CORE_OP[cap] in compiled.asm["ptx"], divisible_by_16=hinted,
                                  config=asdict(cfg))), flush=True)


if __name__ == "__main__":
    main()
