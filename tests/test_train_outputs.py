"""What a user sees of a run: no deprecation warnings caused by the trainer, greedy decoding with
the current cache API, progress output, and the generations files."""
from __future__ import annotations

import warnings

import pytest
import torch

from mio_kernels.train.cli import main

SHORT = ["--sft-steps", "2", "--steps", "2", "--max-train-examples", "32", "--max-eval-examples", "6",
         "--max-new-tokens", "6", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_short_run_emits_no_deprecation_warning(tmp_path):
    """A whole short job (SFT, reference, eval with greedy decoding, preference steps, save, plot)
    raises no FutureWarning/DeprecationWarning: such a warning during a run comes from an API we
    call in a deprecated way (transformers reports it at torch's Module.__call__, not at our line,
    so every one is counted, whatever file it names)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--output-dir", str(tmp_path), "--no-progress", *SHORT]) == 0
    bad = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
           if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, "\n".join(bad)


def test_greedy_generate_matches_uncached_decoding():
    """Batched, left-padded greedy decoding with a KV cache = one prompt at a time, no cache."""
    from mio_kernels.train.data import load_rows, tokenize_rows
    from mio_kernels.train.evaluate import greedy_generate
    from mio_kernels.train.model import BUILTIN_MODEL, PreferenceModel, load_model_and_tokenizer
    from mio_kernels.train.parallelize import Dist

    torch.manual_seed(0)
    lm, tok = load_model_and_tokenizer(BUILTIN_MODEL, tiny=dict(hidden_size=32, num_layers=2, num_heads=2,
                                                                intermediate_size=64))
    lm.eval()
    rows, src = load_rows("builtin:arithmetic", "test")
    examples, _ = tokenize_rows(rows, src, tok, 128, 96, max_rows=5)
    assert len({len(ex.prompt) for ex in examples}) > 1  # left padding is exercised
    got = greedy_generate(PreferenceModel(lm), examples, tok.pad_token_id, tok.eos_token_id, 6, 4, Dist())
    for ex, gen in zip(examples, got):
        ids, want = torch.tensor([ex.prompt]), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(lm(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                want.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert gen == want
