"""Bad input gets a ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

from mio_kernels import FusedMIOLoss, fused_mio_loss, linear_logprobs

from mio_kernels.backends import available_kernel_backends

from conftest import DEVICE

KERNEL_BACKENDS = available_kernel_backends(DEVICE)


def batch(s=4, t=5, h=8, v=50, dtype=torch.float32):
    return dict(hidden=torch.randn(s, t, h, device=DEVICE, dtype=dtype),
                weight=torch.randn(v, h, device=DEVICE, dtype=dtype),
                labels=torch.randint(0, v, (s, t), device=DEVICE),
                ref_logps=torch.randn(s, device=DEVICE))


def call(backend="reference", **changes):
    args = batch()
    args.update(changes)
    args = {k: v for k, v in args.items() if v is not None}
    return fused_mio_loss(**args, backend=backend)


@pytest.mark.parametrize("changes, error, pattern", [
    (dict(weight=torch.randn(50, 9)), ValueError, "hidden sizes must match"),
    (dict(labels=torch.zeros(4, 6, dtype=torch.long)), ValueError, "labels shape"),
    (dict(labels=torch.full((4, 5), 50)), ValueError, r"labels must be in \[0, V=50\)"),
    (dict(labels=torch.full((4, 5), -3)), ValueError, "found -3"),
    (dict(labels=torch.zeros(4, 5)), TypeError, "labels must be an integer tensor"),
    (dict(weight=torch.randn(50, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(hidden=torch.randn(4, 5, 8).int()), TypeError, "hidden must be a floating tensor"),
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(bias=torch.randn(49)), ValueError, r"bias must be \[V\]"),
    (dict(ref_logps=torch.randn(3)), ValueError, r"ref_logps must be \[S\] = \[4\]"),
    (dict(ref_logps=None), ValueError, "got neither"),
    (dict(ref_hidden=torch.randn(4, 5, 8), ref_weight=torch.randn(50, 8)), ValueError, "got both"),
    (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
    (dict(beta=-1.0), ValueError, "beta must be"),
    (dict(label_smoothing=0.5, loss_type="robust"), ValueError, r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=0.1, loss_type="dpo"), ValueError, "only defined for loss_type='robust'"),
    (dict(loss_type="kto"), ValueError, "loss_type must be one of"),
    (dict(num_negatives=2), ValueError, "not divisible by 1 \\+ num_negatives = 3"),
    (dict(num_negatives=0), ValueError, "num_negatives must be an integer >= 1"),
    (dict(sft_weight=-1.0), ValueError, "sft_weight must be"),
    (dict(hidden=torch.randn(0, 5, 8), labels=torch.zeros(0, 5, dtype=torch.long),
          ref_logps=torch.zeros(0)), ValueError, "empty batch"),
    (dict(hidden=torch.randn(20, 8), labels=torch.zeros(20, dtype=torch.long)), ValueError, r"hidden must be \[S, T, H\]"),
    (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
], ids=lambda x: None if not isinstance(x, str) else x[:30])
def test_bad_input_names_the_argument(changes, error, pattern):
    moved = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()}
    backend = moved.pop("backend", "reference")
    args = batch()
    args.update(moved)
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(error, match=pattern):
        fused_mio_loss(**args, backend=backend)


def test_reference_free_rejects_a_reference():
    with pytest.raises(ValueError, match="reference_free=True uses no reference"):
        call(reference_free=True)
    args = batch()
    del args["ref_logps"]
    fused_mio_loss(**args, reference_free=True, backend="reference")  # neither: fine


def test_ref_states_need_both_parts():
    args = batch()
    del args["ref_logps"]
    with pytest.raises(ValueError, match="both ref_hidden and ref_weight"):
        fused_mio_loss(**args, ref_hidden=torch.randn(4, 5, 8, device=DEVICE), backend="reference")
    with pytest.raises(ValueError, match="ref_hidden must be"):
        fused_mio_loss(**args, ref_hidden=torch.randn(4, 6, 8, device=DEVICE),
                       ref_weight=torch.randn(50, 8, device=DEVICE), backend="reference")
    with pytest.raises(ValueError, match="ref_weight"):
        fused_mio_loss(**args, ref_hidden=torch.randn(4, 5, 8, device=DEVICE),
                       ref_weight=torch.randn(51, 8, device=DEVICE), backend="reference")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_non_finite_input_is_a_clear_error(backend, where):
    args = batch()
    args[where][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{where} contains non-finite values"):
        fused_mio_loss(**args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_ref_logps_is_a_clear_error(backend, value):
    args = batch()
    args["ref_logps"][1] = value
    with pytest.raises(ValueError, match="ref_logps contains non-finite values"):
        fused_mio_loss(**args, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_is_refused_plainly(backend):
    args = batch()
    hidden = args.pop("hidden").requires_grad_()
    loss = fused_mio_loss(hidden, **args, backend=backend).loss
    with pytest.raises(RuntimeError, match="second derivatives of the fused kernels are not supported"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    (grad,) = torch.autograd.grad(fused_mio_loss(hidden, **args, backend=backend).loss, hidden)
    assert torch.isfinite(grad).all()  # first order is unaffected
    logps = linear_logprobs(hidden, args["weight"], args["labels"], backend=backend)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(logps.sum(), hidden, create_graph=True)


def test_module_validates_its_config_up_front():
    with pytest.raises(ValueError, match="beta"):
        FusedMIOLoss(beta=0)


def test_linear_logprobs_validates():
    with pytest.raises(ValueError, match="labels shape"):
        linear_logprobs(torch.randn(3, 4, 8), torch.randn(10, 8), torch.zeros(3, 5, dtype=torch.long))


def test_native_backend_missing_is_a_clear_error():
    from mio_kernels.backends import unavailable_reason
    reason = unavailable_reason("native", DEVICE)
    if reason is None:
        pytest.skip("the native extension is built here")
    with pytest.raises(RuntimeError, match="backend='native' is not available"):
        call(backend="native")


def test_labels_dtype_message_says_what_is_accepted():
    with pytest.raises(TypeError, match="int64, int32 or any other integer dtype"):
        call(labels=torch.zeros(4, 5, device=DEVICE))
    args = batch()
    want = fused_mio_loss(**args, backend="reference").loss
    args["labels"] = args["labels"].int()  # int32 is accepted, and the same
    assert torch.equal(fused_mio_loss(**args, backend="reference").loss, want)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_all_ignored_batch_warns_once(backend, monkeypatch):
    import warnings

    import mio_kernels.validation as validation

    monkeypatch.setattr(validation, "_warned_all_ignored", False)
    args = batch()
    args["labels"] = torch.full_like(args["labels"], -100)
    with pytest.warns(UserWarning, match="every label of the batch is ignore_index=-100"):
        out = fused_mio_loss(**args, backend=backend)
    assert torch.isfinite(out.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second all-ignored batch is silent
        fused_mio_loss(**args, backend=backend)
        fused_mio_loss(**batch(), backend=backend)  # a scored batch never warns
    # without check_values there is no host sync, hence no warning
    monkeypatch.setattr(validation, "_warned_all_ignored", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_mio_loss(**args, backend=backend, check_values=False)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "native"])
def test_check_values_does_not_read_ignored_positions(backend):
    """As documented: NaN in hidden where labels are ignored is not reported, and the native
    backend never reads it (finite loss and gradients); at a scored position it is an error."""
    args = batch()
    args["labels"][:, 0] = -100
    hidden = args.pop("hidden")
    hidden[0, 0, 0] = float("nan")
    hidden.requires_grad_(True)
    weight = args.pop("weight").requires_grad_(True)
    out = fused_mio_loss(hidden, weight, **args, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    with torch.no_grad():
        hidden[0, 1, 0] = float("nan")  # scored
    with pytest.raises(ValueError, match="hidden contains non-finite values"):
        fused_mio_loss(hidden, weight, **args, backend=backend)
