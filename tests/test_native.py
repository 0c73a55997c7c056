"""The native backend (csrc/ -> mio_kernels._C) tested directly: against a float64 autograd
oracle, for chunk-size independence, the chunk memory bound, thread determinism and row
skipping; its CUDA epilogue compiled with plain nvcc; CUDA runtime checks where a GPU is.
The exactness tests shared by every backend live in test_fused.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mio_kernels import _native, linear_logprobs
from mio_kernels.backends import native_backend, resolve_backend
from mio_kernels.backends.native_backend import NativeBackend, chunk_budget_bytes, set_chunk_budget_bytes
from mio_kernels.reference import reference_token_logprobs

from conftest import NVCC, nvcc_ptxas_report

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
EXT_REASON = _native.unavailable_reason()
needs_ext = pytest.mark.skipif(EXT_REASON is not None, reason=f"native extension not built: {EXT_REASON}")
CUDA_REASON = ("no CUDA device" if not torch.cuda.is_available() else
               NativeBackend().supports(torch.device("cuda")) if EXT_REASON is None else EXT_REASON)
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA native path not runnable: {CUDA_REASON}")

# tolerance: max |ours - oracle| <= TOL * max |oracle| (per output), inputs rounded to dtype first
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _budget():
    """Each test starts from the default chunk budget and leaves it so."""
    previous = set_chunk_budget_bytes(None)
    yield
    set_chunk_budget_bytes(previous)


def make_inputs(N, H, V, dtype, *, bias=True, scale=1.0, ignore_frac=0.2, device="cpu"):
    hidden = (torch.randn(N, H, dtype=torch.float64) * scale / H ** 0.5).to(dtype)
    weight = torch.randn(V, H, dtype=torch.float64).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < ignore_frac] = IGNORE
    grad = torch.randn(N, dtype=torch.float64)
    grad[labels == IGNORE] = 0.0
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(hidden), to(weight), to(labels), to(b), to(grad)


def oracle(hidden, weight, labels, bias, grad):
    """float64 full logits -> log_softmax -> gather, gradients of sum(grad * logp) by autograd."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    b = None if bias is None else bias.detach().cpu().double().requires_grad_()
    logp = reference_token_logprobs(h, w, labels.cpu(), b, IGNORE)
    (logp * grad.cpu().double()).sum().backward()
    lse = torch.logsumexp(h.detach() @ w.detach().T + (0 if b is None else b.detach()), dim=-1)
    return logp.detach(), torch.where(labels.cpu() == IGNORE, 0.0, lse), h.grad, w.grad, None if b is None else b.grad


def run_native(hidden, weight, labels, bias, grad):
    nb = NativeBackend()
    logp, stats = nb.forward(hidden, weight, labels, bias, IGNORE)
    assert stats.shape == (hidden.shape[0], 2) and stats.dtype == logp.dtype
    d_h, d_w, d_b = nb.backward(hidden, weight, labels, bias, stats, grad.to(logp.dtype), IGNORE, True, True)
    lse = stats[:, 0].double() + stats[:, 1].double()  # row max + log sum exp(z - max)
    return logp, torch.where(labels == IGNORE, 0.0, lse), d_h, d_w, d_b  # CPU skips ignored rows


def rel_err(ours, ref):
    return ((ours.detach().cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close_to_oracle(ours, ref, tol, what=""):
    names = ("logp", "lse", "d_hidden", "d_weight", "d_bias")
    for name, a, r in zip(names, ours, ref):
        if r is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), f"{what} {name} not finite"
        if r.abs().max() == 0:
            assert (a == 0).all(), f"{what} {name} should be 0"
        else:
            assert rel_err(a, r) <= tol, f"{what} {name}: rel err {rel_err(a, r):.2e} > {tol:.0e}"


# ---------------------------------------------------------------- CPU: exactness


SHAPES = [(1, 16, 1009), (67, 24, 1009), (130, 33, 257)]


@needs_ext
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(shape, with_bias, dtype):
    N, H, V = shape
    inputs = make_inputs(N, H, V, dtype, bias=with_bias, ignore_frac=0.0 if N == 1 else 0.2)
    set_chunk_budget_bytes(5 * V * 4)  # several chunks, the last one ragged
    ours = run_native(*inputs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours[0].dtype == acc  # and the softmax stats (run_native checks)
    assert ours[2].dtype == ours[3].dtype == dtype and (ours[4] is None or ours[4].dtype == dtype)
    assert (ours[0][inputs[2] == IGNORE] == 0).all()
    assert_close_to_oracle(ours, oracle(*inputs), TOL[dtype], str(dtype))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_huge_logits(dtype):
    # logits ~1e4: exp overflows without the max shift. fp32 gets the same budget as fp32
    # PyTorch on this input (whose rounding of 1e4-sized logits is the floor), plus TOL.
    inputs = make_inputs(48, 32, 1009, dtype, scale=1e4, bias=True)
    set_chunk_budget_bytes(7 * 1009 * 4)
    ours = run_native(*inputs)
    ref = oracle(*inputs)
    assert ref[0].abs().max() > 1e3
    h, w, labels, b, grad = inputs
    if dtype == torch.float32:
        hf, wf, bf = (t.detach().clone().requires_grad_() for t in (h, w, b))
        lp = torch.log_softmax(hf @ wf.T + bf, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
        lp = torch.where(labels == IGNORE, 0.0, lp)
        (lp * grad.float()).sum().backward()
        torch_err = [rel_err(lp, ref[0]), 0.0, rel_err(hf.grad, ref[2]), rel_err(wf.grad, ref[3]),
                     rel_err(bf.grad, ref[4])]
    else:
        torch_err = [0.0] * 5
    for name, a, r, e in zip(("logp", "lse", "d_hidden", "d_weight", "d_bias"), ours, ref, torch_err):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= TOL[dtype] + 4 * e, (name, rel_err(a, r), e)


@needs_ext
def test_all_ignored_and_zero_grad():
    h, w, labels, b, grad = make_inputs(20, 16, 1009, torch.float32)
    labels.fill_(IGNORE)
    grad.zero_()
    nb = NativeBackend()
    logp, stats = nb.forward(h, w, labels, b, IGNORE)
    assert (logp == 0).all() and native_backend.last_workspace()["num_chunks"] == 0
    d_h, d_w, d_b = nb.backward(h, w, labels, b, stats, grad.float(), IGNORE, True, True)
    assert native_backend.last_workspace()["rows_skipped"] == 20
    assert native_backend.last_workspace()["num_chunks"] == 0
    assert (d_h == 0).all() and (d_w == 0).all() and (d_b == 0).all()


@needs_ext
def test_gradient_flags_and_bias():
    h, w, labels, b, grad = make_inputs(9, 8, 300, torch.float32, bias=False)
    nb = NativeBackend()
    _, stats = nb.forward(h, w, labels, None, IGNORE)
    d_h, d_w, d_b = nb.backward(h, w, labels, None, stats, grad.float(), IGNORE, True, False)
    assert d_h is not None and d_w is None and d_b is None
    d_h, d_w, d_b = nb.backward(h, w, labels, None, stats, grad.float(), IGNORE, False, True)
    assert d_h is None and d_w is not None and d_b is None
    assert nb.backward(h, w, labels, None, stats, grad.float(), IGNORE, False, False) == (None, None, None)


# ---------------------------------------------------------------- CPU: chunking, memory, threads


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_size_only_changes_rounding(dtype):
    N, H, V = 96, 40, 1531
    inputs = make_inputs(N, H, V, dtype)
    set_chunk_budget_bytes(1)  # one row per chunk
    tiny = run_native(*inputs)
    assert native_backend.last_workspace()["chunk_rows"] == 1
    set_chunk_budget_bytes(2**30)  # everything in one chunk
    huge = run_native(*inputs)
    assert native_backend.last_workspace()["num_chunks"] == 1
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 grads: one rounding of different sums
    for a, b in zip(tiny, huge):
        assert rel_err(a, b.double()) <= tol


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_budget_bounds_the_largest_temporary(dtype):
    from torch.profiler import ProfilerActivity, profile

    N, H, V = 512, 32, 4096  # N x V fp32 = 8 MiB; V x H fp32 = 512 KiB
    budget = 256 * 1024  # 16 rows
    inputs = make_inputs(N, H, V, dtype)
    set_chunk_budget_bytes(budget)
    nb = NativeBackend()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logp, stats = nb.forward(*inputs[:4], IGNORE)
        fwd = native_backend.last_workspace()
        nb.backward(*inputs[:4], stats, inputs[4].float(), IGNORE, True, True)
        bwd = native_backend.last_workspace()
    per_param = V * H * 4 + V * 4 if dtype != torch.float32 else 0  # fp32 copy of W, b (once)
    for stats in (fwd, bwd):
        assert stats["chunk_rows"] == budget // (V * 4)
        assert stats["logits_bytes"] <= budget
        # the formula of native_backend's docstring
        assert stats["workspace_bytes"] <= budget + 2 * per_param + 3 * stats["chunk_rows"] * H * 4 + V * 4
    # Independently: no single allocation (ours or ATen's inside the extension) exceeds the
    # budget or a parameter-sized fp32 buffer, and none is anywhere near N x V.
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert largest <= max(budget, V * H * 4, N * H * 4), largest
    assert largest < N * V * 4 // 8


@needs_ext
def test_fixed_threads_are_deterministic():
    inputs = make_inputs(200, 48, 2003, torch.float32)
    set_chunk_budget_bytes(37 * 2003 * 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run_native(*inputs)
        second = run_native(*inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_ext
def test_zero_gradient_rows_are_skipped():
    N, H, V = 120, 24, 1009
    h, w, labels, b, grad = make_inputs(N, H, V, torch.float64)
    grad[40:100] = 0.0  # a whole run of zero-gradient rows, plus scattered ignored ones
    set_chunk_budget_bytes(16 * V * 8)
    ours = run_native(h, w, labels, b, grad)
    stats = native_backend.last_workspace()
    assert stats["rows_skipped"] == int((grad == 0).sum())
    assert stats["num_chunks"] == -(-(N - stats["rows_skipped"]) // 16)
    assert_close_to_oracle(ours, oracle(h, w, labels, b, grad), TOL[torch.float64])


# ---------------------------------------------------------------- configuration and availability


def test_chunk_budget_configuration(monkeypatch):
    monkeypatch.delenv(native_backend.ENV_CHUNK_MB, raising=False)
    assert chunk_budget_bytes(torch.device("cpu")) == 64 * 2**20
    monkeypatch.setenv(native_backend.ENV_CHUNK_MB, "0.5")
    assert chunk_budget_bytes(torch.device("cpu")) == 2**19
    set_chunk_budget_bytes(1234)
    assert chunk_budget_bytes(torch.device("cpu")) == 1234
    set_chunk_budget_bytes(None)
    monkeypatch.setenv(native_backend.ENV_CHUNK_MB, "lots")
    with pytest.raises(ValueError, match=native_backend.ENV_CHUNK_MB):
        chunk_budget_bytes(torch.device("cpu"))
    with pytest.raises(ValueError):
        set_chunk_budget_bytes(0)


@needs_ext
def test_supports():
    nb = NativeBackend()
    assert nb.supports(torch.device("cpu")) is None
    assert "cpu and cuda" in nb.supports(torch.device("meta"))
    assert (nb.supports(torch.device("cuda")) is None) == _native.with_cuda()


def test_missing_extension_is_a_clear_message():
    # A fresh interpreter in which importing mio_kernels._C fails.
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mio_kernels._C":
            raise ImportError("simulated: not built")
sys.meta_path.insert(0, Block())
import torch
from mio_kernels.backends import resolve_backend, unavailable_reason
reason = unavailable_reason("native", torch.device("cpu"))
assert reason is not None and "mio_kernels._C" in reason and "pip install" in reason, reason
try:
    resolve_backend("native", torch.device("cpu"))
except RuntimeError as err:
    assert "mio_kernels._C" in str(err), err
else:
    raise AssertionError("no error")
assert resolve_backend("auto", torch.device("cpu")) != "native"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@needs_ext
def test_dispatch_picks_native_on_cpu():
    assert resolve_backend("native", torch.device("cpu")) == "native"


def test_auto_fallback_to_reference_warns_once_with_the_reason(monkeypatch):
    import warnings

    from mio_kernels import backends

    reason = "simulated: mio_kernels._C not built; build it with pip install"
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: reason)
    monkeypatch.setattr(backends, "_warned_reference_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = backends.resolve_backend("auto", torch.device("cpu"))
        second = backends.resolve_backend("auto", torch.device("cpu"))
    assert first == second == "reference"
    fallback = [w for w in caught if "full-logits reference" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert reason in str(fallback[0].message) and "pip install --no-build-isolation" in str(fallback[0].message)


@pytest.mark.parametrize("built", [("native", "triton"), ("triton",), ()])
def test_auto_on_cuda_prefers_native_then_triton(monkeypatch, built):
    """auto on CUDA tensors: the native extension's CUDA build (it has the single pass), else Triton,
    else the reference. Availability is faked: no GPU needed."""
    from mio_kernels import backends

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name in built else "absent")
    monkeypatch.setattr(backends, "_warned_reference_fallback", True)
    expected = built[0] if built else "reference"
    assert backends.resolve_backend("auto", torch.device("cuda")) == expected


# ---------------------------------------------------------------- CUDA epilogue: compile-only and runtime


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_epilogue_compiles_with_plain_nvcc(arch, tmp_path):
    # The .cu depends on the CUDA runtime only: no torch headers, no CUDA device needed.
    report = nvcc_ptxas_report("logprob_epilogue.cu", arch, tmp_path)
    assert "spill" in report and " 0 bytes spill stores" in report
    assert all(" 0 bytes spill stores" in line for line in report.splitlines() if "spill stores" in line), report


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_matches_float64_oracle(dtype, with_bias):
    N, H, V = 203, 64, 3001
    inputs = make_inputs(N, H, V, dtype, bias=with_bias, device="cuda")
    set_chunk_budget_bytes(37 * V * 4)  # several chunks, the last ragged
    ours = run_native(*inputs)
    assert ours[2].dtype == dtype and ours[2].is_cuda
    assert_close_to_oracle(ours, oracle(*inputs), TOL[dtype], f"cuda {dtype}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_chunk_size_only_changes_rounding_and_matches_cpu(dtype):
    inputs = make_inputs(150, 48, 1531, dtype, device="cuda")
    set_chunk_budget_bytes(1)
    tiny = run_native(*inputs)
    set_chunk_budget_bytes(2**30)
    huge = run_native(*inputs)
    cpu = run_native(*(None if t is None else t.cpu() for t in inputs))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b, c in zip(tiny, huge, cpu):
        assert rel_err(a, b.double().cpu()) <= tol and rel_err(a, c.double()) <= tol


@needs_cuda
def test_cuda_huge_logits_and_ignored_rows():
    h, w, labels, b, grad = make_inputs(64, 32, 1009, torch.float32, scale=1e4, device="cuda")
    labels[:10] = IGNORE
    grad[:10] = 0.0
    logp, lse, d_h, d_w, d_b = run_native(h, w, labels, b, grad)
    assert torch.isfinite(lse).all() and (logp[:10] == 0).all() and (d_h[:10] == 0).all()


def test_entropy_of_near_certain_rows():
    """exp below fp32's range is 0, not exp(-87): the entropy's moment sums exp(d) * d, and a floor of
    1.6e-38 at d ~ -4e3 put ~3e-32 into rows whose entropy is 1e-35 or 0. Compared with the float64
    closed forms, H = -sum p log p and dH/dz = -p (log p + H) (autograd through log_softmax loses
    these rows' gradient to cancellation, in float64 too)."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(6, 4), torch.randn(448, 4) * 400
    labels = torch.randint(0, 448, (6,))
    x = hidden.clone().requires_grad_()
    _, entropy = linear_logprobs(x, weight, labels, backend="native", logit_scale=1.752, return_entropy=True)
    entropy.sum().backward()
    z = (hidden.double() @ weight.double().T) * 1.752
    d = z - z.max(-1, keepdim=True).values        # log_softmax with log1p of the non-max terms: torch's
    rest = torch.where(d < 0, d.exp(), 0.0).sum(-1, keepdim=True)   # m + log(s) rounds log(s) ~ 1e-19 away
    log_p = d - torch.log1p(rest)
    exact = -(log_p.exp() * log_p).sum(-1)
    d_z = -log_p.exp() * (log_p + exact[:, None])
    exact_grad = (d_z * 1.752) @ weight.double()
    # fp32 logits of ~3e3 carry ~2e-4 of rounding into each gap (d log p = d gap): ~1e-3 relative
    assert ((entropy.double() - exact).abs() <= 1e-3 * exact.abs() + 1e-37).all(), (entropy, exact)
    assert ((x.grad.double() - exact_grad).norm() / exact_grad.norm()).item() <= 1e-3
