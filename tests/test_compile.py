"""torch.compile(fullgraph=True) of a training step that calls the fused op: no graph break on any
backend (the kernels are custom ops with fake implementations), same loss and gradients as eager.

aot_eager runs Dynamo and AOTAutograd (where graph breaks and fake-tensor problems show) without
Inductor's C++ compilation, which would add minutes on a CPU runner and tests nothing of ours."""
import pytest
import torch
from torch import nn

from mio_kernels import fused_mio_loss, linear_logprobs
from mio_kernels.backends import available_kernel_backends

from conftest import DEVICE

BACKENDS = ["reference", *available_kernel_backends(DEVICE)]


class TinyPolicy(nn.Module):
    def __init__(self, vocab=67, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, input_ids):
        return torch.tanh(self.mix(self.embed(input_ids)))


def preference_loss(model, input_ids, labels, ref_logps, backend, cu_seqlens=None):
    out = fused_mio_loss(model.hidden_states(input_ids), model.lm_head.weight, labels, cu_seqlens=cu_seqlens,
                         ref_logps=ref_logps, backend=backend, check_values=False, num_negatives=2,
                         final_logit_softcapping=30.0)
    return out.loss, out.metrics["rewards/margins"]


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_has_no_graph_break(backend, packed):
    torch._dynamo.reset()
    model = TinyPolicy().to(DEVICE)
    input_ids = torch.randint(0, 67, (6, 5), device=DEVICE)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = labels[:, :2] = -100
    ref_logps = -20 * torch.rand(6, device=DEVICE)
    cu_seqlens = None
    if packed:  # the same six sequences back to back
        input_ids, labels = input_ids.reshape(-1), labels.reshape(-1)
        cu_seqlens = torch.arange(0, 31, 5, device=DEVICE, dtype=torch.int32)
    args = (model, input_ids, labels, ref_logps, backend, cu_seqlens)
    compiled = torch.compile(preference_loss, fullgraph=True, backend="aot_eager")
    loss, margin = compiled(*args)
    eager_loss, eager_margin = preference_loss(*args)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(margin, eager_margin, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_of(model, loss), grads_of(model, eager_loss)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_logprobs_and_entropy(backend):
    torch._dynamo.reset()
    model = TinyPolicy().to(DEVICE)
    input_ids = torch.randint(0, 67, (3, 7), device=DEVICE)

    def objective(ids):
        logps, entropy = linear_logprobs(model.hidden_states(ids), model.lm_head.weight, ids, backend=backend,
                                         temperature=0.7, return_entropy=True, check_values=False)
        return (logps - 0.01 * entropy).sum()

    loss = torch.compile(objective, fullgraph=True, backend="aot_eager")(input_ids)
    eager = objective(input_ids)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_of(model, loss), grads_of(model, eager)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
