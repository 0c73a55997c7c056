"""No tensor of N x V elements is ever allocated by the fused op (forward + backward).

Deterministic: every tensor an ATen op produces is recorded through a TorchDispatchMode (kernel
launchers and the autograd glue go through the dispatcher), and the largest (in bytes) must stay
far below N * V fp32 logits.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mio_kernels import fused_mio_loss, linear_logprobs
from mio_kernels.backends import available_kernel_backends

from conftest import DEVICE

# The native backend allocates its chunk buffers inside the extension, out of this probe's sight;
# its bound is asserted by tests/test_native.py::test_chunk_budget_bounds_the_largest_temporary.
BACKENDS = tuple(b for b in available_kernel_backends(DEVICE) if b != "native")


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


S, T, H, V = 4, 96, 16, 4096  # N x V = 1.5M elements; N*H, V*H <= 65k


def _inputs():
    hidden = torch.randn(S, T, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, H, device=DEVICE, requires_grad=True)
    bias = torch.randn(V, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (S, T), device=DEVICE)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_token_by_vocab_tensor(backend):
    hidden, weight, bias, labels = _inputs()
    with LargestTensor() as mode:
        out = fused_mio_loss(hidden, weight, labels, bias=bias, ref_logps=torch.zeros(S, device=DEVICE),
                             backend=backend)
        out.loss.backward()
        linear_logprobs(hidden, weight, labels, bias=bias, backend=backend).sum().backward()
    n = S * T
    assert mode.nbytes <= max(n, V) * H * 4, (mode.nbytes, n * V * 4)  # the largest is fp32 dH or dW
    assert mode.nbytes < n * V * 4 // 16


def test_reference_does_hold_the_logits():
    # The probe itself works: the naive path is caught holding N x V.
    hidden, weight, bias, labels = _inputs()
    with LargestTensor() as mode:
        fused_mio_loss(hidden, weight, labels, bias=bias, ref_logps=torch.zeros(S, device=DEVICE),
                       backend="reference").loss.backward()
    assert mode.nbytes >= S * T * V * 4
