"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on a machine without a GPU, with
the shipped GPU launch configuration and the JIT's specialisation (divisibility-16 hints on
pointers, strides and H), reports registers and spills, and the bf16/fp16 paths use tensor-core
instructions (mma on sm_80, wgmma on sm_90). Runs `python -m mio_kernels.kernels.aot` in a fresh process, since
the interpreter the other tests use cannot compile."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def aot_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "mio_kernels.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def builds():
    return aot_report()


def test_every_kernel_compiles_for_both_archs(builds):
    built = {(b["kernel"], b["arch"], b["dtype"]) for b in builds}
    assert built == {(k, a, d) for k in ("forward", "backward") for a in ("sm_80", "sm_90")
                     for d in ("bf16", "fp16", "fp32")}
    for b in builds:
        assert b["cubin_bytes"] > 0
        limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}[b["arch"]]
        assert 0 < b["shared_bytes"] <= limit, b
        print(f"{b['kernel']} {b['arch']} {b['dtype']}: {b['shared_bytes']} B shared memory")


def test_low_precision_paths_use_tensor_cores(builds):
    for b in builds:
        if b["dtype"] in ("bf16", "fp16"):
            assert b["tensor_cores"], f"{b['kernel']} {b['dtype']} on {b['arch']} has no mma/wgmma in its PTX"


def test_jit_specialisation_and_register_report(builds):
    for b in builds:
        hinted = set(b["divisible_by_16"])
        assert {"H", "W", "Y", "D", "stride_hn", "stride_wv"} <= hinted, b
        assert 0 < b["n_regs"] <= 255, b
        for key in ("n_spills", "spill_store_bytes", "spill_load_bytes", "stack_frame_bytes"):
            assert isinstance(b[key], int) and b[key] >= 0, (key, b)
        print(f"{b['kernel']} {b['arch']} {b['dtype']}: {b['n_regs']} registers, {b['n_spills']} spills "
              f"({b['spill_store_bytes']} B stored, {b['spill_load_bytes']} B loaded), {b['shared_bytes']} B shared")


def _spilling(builds):
    return [f"{b['kernel']} {b['arch']} {b['dtype']} {b['variant']}: {b['n_regs']} registers, {b['n_spills']} spills "
            f"({b['spill_store_bytes']} B stored), config {b['config']}" for b in builds if b["n_spills"] or
            b["spill_store_bytes"] or b["spill_load_bytes"]]


def test_no_kernel_spills_in_any_dtype(builds):
    """The shipped launch configuration of every dtype (config.gpu_*_config) keeps both kernels in registers
    on sm_80 and sm_90 (fp32's own tiles: the bf16 ones spilled 664-684 words in the fp32 backward)."""
    assert {b["dtype"] for b in builds} == {"bf16", "fp16", "fp32"}
    assert not _spilling(builds), _spilling(builds)


def test_fp32_entropy_softcap_variant_does_not_spill():
    """fp32 with the entropy and soft-capping on, the most registers a launch takes, spills nothing either."""
    builds = aot_report("--dtypes", "fp32", "--variant", "entropy-softcap")
    assert {(b["kernel"], b["arch"], b["variant"]) for b in builds} == {
        (k, a, "entropy-softcap") for k in ("forward", "backward") for a in ("sm_80", "sm_90")}
    assert not _spilling(builds), _spilling(builds)
