"""Padding-free training (--padding-free): packed rows give the padded results to fp32 rounding.

Covered here: collate_packed's layout and the token-budget packing; the built-in tiny Llama's
per-sequence log-probs packed == padded (so packed sequences attend only within themselves); one
optimizer step padded vs padding-free (loss, gradients, updated weights), in one process and
under 2-process FSDP2 (gloo); SIGKILL + --resume stays exact; models that cannot keep packed
sequences apart are refused at start.

Tolerance: fp32 everywhere; packed and padded differ only in summation order (GEMM shapes,
attention over a different key length). Losses agree to 1e-5 relative, gradients to
rtol = 1e-4 and atol = 5e-5 * max|g| of each parameter (measured: up to 1.2e-5 * max|g|, where
the accumulation over different micro-batches sums in another order).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mio_kernels.train.data import (BUILTIN_DATASET, collate, collate_packed, load_rows, pack_by_tokens,
                                    packed_tokens, tokenize_rows)
from mio_kernels.train.model import builtin_tokenizer

HERE = Path(__file__).resolve()
TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-heads", "2", "--tiny-intermediate-size", "64",
        "--max-train-examples", "32", "--no-eval", "--no-progress", "--no-plot", "--threads", "1"]
BUDGET = "300"  # a few prompts (4 responses each) per micro-batch: several micro-batches per step


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def examples_of(tok, n=6, max_length=128):
    rows, src = load_rows(BUILTIN_DATASET, "train")
    return tokenize_rows(rows, src, tok, max_length, max_length - 8, None, n)


# ----------------------------------------------------------------------------- data layer

@pytest.mark.parametrize("responses", [None, [0]])
def test_collate_packed_is_the_padded_rows_concatenated(tok, responses):
    examples, k = examples_of(tok, 3)
    padded = collate(examples, tok.pad_token_id, responses=responses)
    packed = collate_packed(examples, responses=responses)
    rows = padded["input_ids"].shape[0]
    cu = packed["cu_seqlens"]
    assert rows == (1 + k if responses is None else 1) * 3 and cu.shape == (rows + 1,) and cu.dtype == torch.int32
    assert packed["input_ids"].shape == packed["position_ids"].shape == (1, int(cu[-1]))
    assert packed["labels"].shape == (int(cu[-1]),)
    for row in range(rows):  # same order: chosen block, then K rejected blocks of P rows
        lo, hi = int(cu[row]), int(cu[row + 1])
        n = int(padded["attention_mask"][row].sum())
        assert hi - lo == n
        assert torch.equal(packed["input_ids"][0, lo:hi], padded["input_ids"][row, :n])
        assert torch.equal(packed["labels"][lo:hi], padded["labels"][row, :n])
        # shifted within the sequence: position t predicts token t + 1 of the same sequence; the
        # sequence's final token (EOS) is no input (as in the padded row), so nothing crosses into the next
        ex, j = examples[row % 3], (row // 3 if responses is None else 0)
        assert packed["labels"][hi - 1] == (ex.prompt + ex.responses[j])[-1]
        assert (packed["labels"][lo:lo + len(ex.prompt) - 1] == -100).all()
        assert packed["position_ids"][0, lo:hi].tolist() == list(range(n))
    assert sum(packed_tokens(ex, responses) for ex in examples) == int(cu[-1])


def test_pack_by_tokens():
    sizes = [50, 400, 120, 80, 300, 10, 90, 200]
    bins = pack_by_tokens(sizes, 300)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # each prompt once, whole
    assert [1] in bins  # over the budget: a micro-batch of its own
    assert all(sum(sizes[i] for i in b) <= 300 for b in bins if b != [1])
    assert all(b == sorted(b) for b in bins) and bins == pack_by_tokens(sizes, 300)
    assert len(bins) == 4  # first-fit decreasing: 400 | 300 | 200+90+10 | 120+80+50
    more = pack_by_tokens(sizes, 300, min_bins=6)
    assert len(more) == 6 and sorted(i for b in more for i in b) == list(range(len(sizes)))
    with pytest.raises(ValueError, match="micro-batches"):
        pack_by_tokens(sizes, 300, min_bins=9)


# ----------------------------------------------------------------------------- the model

def test_packed_sequence_logps_equal_padded(tok):
    """The built-in tiny Llama (sdpa): packed rows get the padded rows' per-sequence log-probs, so
    transformers' block-diagonal mask from the restarting position_ids keeps sequences apart."""
    from mio_kernels.objective import PreferenceConfig
    from mio_kernels.train.evaluate import sequence_logps
    from mio_kernels.train.model import HeadTasks, PreferenceModel, build_tiny_llama
    from mio_kernels.train.parallelize import Dist

    torch.manual_seed(0)
    lm = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128).eval()
    examples, k = examples_of(tok, 10)
    tasks = HeadTasks(PreferenceConfig(num_negatives=k), "reference")
    model = PreferenceModel(lm)
    padded = sequence_logps(model, examples, tasks, 4, tok.pad_token_id, Dist())
    packed = sequence_logps(model, examples, tasks, 4, tok.pad_token_id, Dist(), packing=400)
    assert torch.equal(packed.counts, padded.counts)
    scale = padded.sums.abs().max().item()
    torch.testing.assert_close(packed.sums, padded.sums, rtol=1e-5, atol=1e-6 * scale)


def test_packing_probe_catches_attention_that_ignores_the_mask(tok):
    """A Llama whose attention ignores the mask (plain causal over the whole row) is refused."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mio_kernels.train.model import build_tiny_llama, check_packed_attention, packed_attention_problem

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("causal_only_test", causal_only)
    lm = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    assert packed_attention_problem(lm) is None
    lm.config._attn_implementation = "causal_only_test"
    with pytest.raises(ValueError, match=r"model type 'llama'.*causal_only_test.*--no-padding-free"):
        check_packed_attention(lm)


def test_unsupported_model_is_refused_at_start(tmp_path, tok, capsys):
    """A recurrent model (Mamba: its config says 'eager' attention, but its layers carry state
    across the packed row and ignore position_ids) -> one-line error naming it; padded is accepted."""
    from transformers import MambaConfig, MambaForCausalLM

    from mio_kernels.train.cli import main
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.trainer import Trainer

    MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, state_size=4,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "tok")
    args = ["--model", str(tmp_path / "mamba"), "--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path),
            "--max-train-examples", "4", "--no-eval", "--no-progress", "--threads", "1", "--steps", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    [err] = [line for line in err.splitlines() if "error" in line]  # (transformers warns about Mamba's kernels)
    print(err)
    assert "--padding-free" in err and "'mamba'" in err and "--no-padding-free" in err
    Trainer(parse_args(args + ["--no-padding-free", "--name", "padded"]))  # padded batches are fine


# ----------------------------------------------------------------------------- one optimizer step

def step(trainer, phase):
    """Loss, gradients and updated weights of the phase's first optimizer step."""
    spec = trainer.phases[phase]
    trainer.state.optimizer = trainer.make_optimizer(spec)
    stats = trainer.forward_backward(spec, trainer.step_indices(spec, 0))
    loss = stats["loss"].clone()
    if trainer.d.enabled:
        torch.distributed.all_reduce(loss)
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
    trainer.optimizer_step(lr=1e-3)
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
               for n, p in trainer.model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "weights": weights,
            "micro_batches": len(trainer.micro_batches(spec, trainer.step_indices(spec, 0)))}


def both_modes(out: Path, *extra: str):
    """{mode: {phase: step(...)}} for padded and padding-free trainers started from the same seed."""
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.trainer import Trainer

    results = {}
    for mode in ("--no-padding-free", "--padding-free"):
        trainer = Trainer(parse_args(TINY + ["--output-dir", str(out), "--name", mode.strip("-"), mode,
                                             "--max-tokens-per-micro-batch", BUDGET, "--batch-size", "8",
                                             "--micro-batch-size", "3", "--sft-batch-size", "8",
                                             "--sft-micro-batch-size", "3", *extra]))
        results[mode] = {"sft": step(trainer, "sft")}
        trainer.state.optimizer = None
        trainer.compute_reference()
        results[mode]["pref"] = step(trainer, "pref")
    return results["--no-padding-free"], results["--padding-free"]


def assert_same_step(padded, packed):
    worst = 0.0
    for phase in ("sft", "pref"):
        a, b = padded[phase], packed[phase]
        assert b["micro_batches"] > 1 or phase == "sft"  # gradient accumulation over packed rows
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), phase
        for name, g in a["grads"].items():
            scale = g.abs().max().item()
            torch.testing.assert_close(b["grads"][name], g, rtol=1e-4, atol=5e-5 * scale, msg=f"{phase} {name}")
            worst = max(worst, (b["grads"][name] - g).abs().max().item() / max(scale, 1e-30))
        for name, w in a["weights"].items():  # one AdamW step later
            torch.testing.assert_close(b["weights"][name], w, rtol=1e-4, atol=1e-5, msg=f"{phase} {name}")
    return worst


@pytest.mark.parametrize("reference", ["precompute", "online"])
def test_one_step_padded_equals_padding_free(tmp_path, reference):
    padded, packed = both_modes(tmp_path, "--reference", reference)
    worst = assert_same_step(padded, packed)
    print(f"worst gradient difference, packed vs padded: {worst:.2e} * max|g|")


def test_one_step_padded_equals_padding_free_fsdp(tmp_path):
    """The same under FSDP2 on 2 processes (gloo): each process packs its share of the step, as
    many micro-batches as the other."""
    from test_train_fsdp import free_port, run

    out = tmp_path / "result.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(HERE), str(tmp_path), str(out)], {"OMP_NUM_THREADS": "1"})
    padded, packed = torch.load(out)
    worst = assert_same_step(padded, packed)
    print(f"FSDP: worst gradient difference, packed vs padded: {worst:.2e} * max|g|")


def test_sigkill_then_resume_is_exact_padding_free(tmp_path):
    from test_train_checkpoint import kill_and_resume

    kill_and_resume(tmp_path, "--padding-free", "--max-tokens-per-micro-batch", BUDGET)


def test_budget_is_validated():
    from mio_kernels.train.config import parse_args

    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch"):
        parse_args(["--max-tokens-per-micro-batch", "0"])


if __name__ == "__main__":  # one rank of the FSDP test
    result = both_modes(Path(sys.argv[1]))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        torch.save(result, sys.argv[2])
