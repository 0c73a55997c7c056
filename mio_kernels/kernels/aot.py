"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90, no GPU needed, with the
specialisation the GPU JIT would pick at a representative launch.

    python -m mio_kernels.kernels.aot        # prints one JSON line per (kernel, arch, dtype)
    python -m mio_kernels.kernels.aot --variant all --dtypes fp32   # + the entropy/soft-cap variant

Variants: "plain" (bias, no logit transform, no entropy: what the preference loss launches) and
"entropy-softcap" (entropy and soft-capping on: the most registers a launch of the kernel can take).
Launch configuration per dtype: config.gpu_forward_config / gpu_backward_config.

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
TENSOR_CORE_OP = {80: "mma.sync", 90: "wgmma"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# constexprs of each variant: (TRANSFORM, ENTROPY)
VARIANTS = {"plain": (0, False), "entropy-softcap": (2, True)}


def _launch_args(kernel_name: str, dtype: torch.dtype, softcap: bool = False) -> dict:
    """The runtime (non-constexpr) arguments the launchers pass at the representative shape."""
    n, v, d = TOKENS, VOCAB, HIDDEN
    io_ = dict(H=MockTensor(dtype), W=MockTensor(dtype), Y=MockTensor(torch.int64), B=MockTensor(dtype))
    f32 = MockTensor(torch.float32)
    transform = dict(scale=1.0 / 30.0, cap=30.0) if softcap else dict(scale=1.0, cap=0.0)
    if kernel_name == "forward":
        cfg = gpu_forward_config(d, dtype=dtype)
        v_per_split = triton.cdiv(triton.cdiv(v, cfg.v_splits), cfg.block_v) * cfg.block_v
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


def builds(dtypes=tuple(DTYPES), variants=("plain",)):
    """(name, dtype, variant, kernel, runtime args, constexprs, config) for every kernel x dtype x variant,
    with the launch configuration the launchers pick for that dtype."""
    for dtype, variant in ((d, v) for d in dtypes for v in variants):
        torch_dtype, (transform, entropy) = DTYPES[dtype], VARIANTS[variant]
        forward, backward = gpu_forward_config(HIDDEN, dtype=torch_dtype), gpu_backward_config(HIDDEN, torch_dtype)
        common = dict(HAS_BIAS=True, TRANSFORM=transform, ENTROPY=entropy, UPCAST=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        yield ("forward", dtype, variant, logprob_forward_kernel, _launch_args("forward", torch_dtype, transform == 2),
               dict(common, BLOCK_N=forward.block_n, BLOCK_V=forward.block_v, BLOCK_D=forward.block_d), forward)
        yield ("backward", dtype, variant, logprob_backward_kernel,
               _launch_args("backward", torch_dtype, transform == 2),
               dict(common, COMPUTE_DH=True, COMPUTE_DW=True, BLOCK_N=backward.block_n, BLOCK_V=backward.block_v,
                    BLOCK_D=backward.block_d, GROUP_N=backward.group_n), backward)


def _parse(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m mio_kernels.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated of bf16, fp16, fp32 (default: all)")
    p.add_argument("--variant", default="plain", choices=sorted(VARIANTS) + ["all"])
    args = p.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    return dtypes, tuple(VARIANTS) if args.variant == "all" else (args.variant,)


def main(argv=None) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter cannot compile")
    dtypes, variants = _parse(argv)
    for name, dtype, variant, kernel, args, constexprs, cfg in builds(dtypes, variants):
        for cap in (80, 90):
            compiled, hinted, usage = compile_kernel(kernel, args, constexprs, cfg, cap)
            print(json.dumps(dict(kernel=name, arch=f"sm_{cap}", dtype=dtype, variant=variant,
                                  shared_bytes=compiled.metadata.shared, **usage,
                                  cubin_bytes=len(compiled.asm["cubin"]),
                                  tensor_cores=TENSOR_CORE_OP[cap] in compiled.asm["ptx"], divisible_by_16=hinted,
                                  config=asdict(cfg))), flush=True)


if __name__ == "__main__":
    main()
