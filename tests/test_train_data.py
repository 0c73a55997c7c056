"""Trainer data pipeline: named errors for malformed rows, truncation rules, the row layout."""
from __future__ import annotations

import json

import pytest
import torch

from mio_kernels.train.data import (BUILTIN_DATASET, DatasetRowError, collate, collate_prompts, final_answer,
                                    load_rows, sample_order, tokenize_rows)
from mio_kernels.train.model import build_tokenizer, builtin_tokenizer

GOOD = {"prompt": "Ann has 3 pens.", "chosen": " 3 pens", "rejected": [" 4 pens", " 5 pens"]}


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_and_tokenize(path, tok, **kw):
    rows, src = load_rows(str(path))
    return tokenize_rows(rows, src, tok, kw.pop("max_length", 64), kw.pop("max_prompt_length", 32), **kw)


BAD_ROWS = [
    ({"chosen": " 3", "rejected": " 4"}, "prompt", "is missing"),
    ({"prompt": "x", "chosen": None, "rejected": " 4"}, "chosen", "is missing"),
    ({"prompt": "x", "chosen": 3, "rejected": " 4"}, "chosen", "must be a string"),
    ({"prompt": "x", "chosen": "  ", "rejected": " 4"}, "chosen", "is empty"),
    ({"prompt": "x", "chosen": " 3", "rejected": []}, "rejected", "non-empty list"),
    ({"prompt": "x", "chosen": " 3", "rejected": [" 4", 5]}, "rejected", "item 1 must be a string"),
    ({"prompt": "x", "chosen": " 3", "rejected": 7}, "rejected", "must be a string or a non-empty list"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": " 3", "rejected": " 4"}, "prompt", "conversational"),
    ({"prompt": "x", "chosen": " 3", "rejected": [" 4"]}, "rejected", "has 1 responses"),  # K differs from row 0
]


@pytest.mark.parametrize("bad,field,problem", BAD_ROWS, ids=[f"{f}:{p}" for _, f, p in BAD_ROWS])
def test_malformed_row_is_named(tmp_path, tok, bad, field, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DatasetRowError) as err:
        load_and_tokenize(path, tok)
    assert (err.value.row, err.value.field) == (2, field)
    assert f"row 2: field {field!r}" in str(err.value) and problem in str(err.value) and str(path) in str(err.value)


def test_invalid_json_line_is_named(tmp_path, tok):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DatasetRowError, match="row 1: field '<json>'"):
        load_and_tokenize(path, tok)


def test_parquet_and_json_array_load(tmp_path, tok):
    import datasets

    pq = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list([GOOD] * 3).to_parquet(str(pq))
    arr = tmp_path / "prefs.json"
    arr.write_text(json.dumps([GOOD] * 3))
    for path in (pq, arr):
        examples, k = load_and_tokenize(path, tok)
        assert len(examples) == 3 and k == 2
    bad = dict(GOOD, rejected=[" 4", None])
    datasets.Dataset.from_list([GOOD, bad]).to_parquet(str(pq))
    with pytest.raises(DatasetRowError, match="row 1: field 'rejected'"):
        load_and_tokenize(pq, tok)


def test_string_rejected_and_num_negatives(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [dict(GOOD, rejected=" 9 pens")] * 2)
    examples, k = load_and_tokenize(path, tok)
    assert k == 1 and len(examples[0].responses) == 2
    path = write_jsonl(tmp_path / "q.jsonl", [GOOD, dict(GOOD, rejected=[" 1", " 2", " 3"])])
    examples, k = load_and_tokenize(path, tok, num_negatives=2)  # the first K of each row
    assert k == 2 and all(len(ex.responses) == 3 for ex in examples)


def test_tokenisation_and_truncation(tok):
    eos, bos = tok.eos_token_id, tok.bos_token_id
    row = {"prompt": "Ann has 12 pens. She gets 3 more pens.", "chosen": " 12 + 3 = 15. #### 15",
           "rejected": [" 12 - 3 = 9. #### 9"]}
    (ex,), _ = tokenize_rows([row], "mem", tok, max_length=64, max_prompt_length=32)
    assert ex.prompt[0] == bos and ex.responses[0][-1] == eos and not ex.truncated
    assert tok.decode(ex.prompt + ex.responses[0], skip_special_tokens=True) == row["prompt"] + row["chosen"]
    assert ex.answer == "15"
    # Rule 1: the prompt keeps its last max_prompt_length tokens; rule 2: responses are cut on the right.
    (tr,), _ = tokenize_rows([row], "mem", tok, max_length=12, max_prompt_length=5)
    assert tr.truncated and tr.prompt == ex.prompt[-5:]
    assert tr.responses[0] == ex.responses[0][:7] and tr.responses[1] == ex.responses[1][:7]
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_rows([row], "mem", tok, max_length=8, max_prompt_length=8)


def test_collate_layout(tok):
    rows = [{"prompt": "Ann has 3 pens.", "chosen": " 3", "rejected": [" 4", " 55 pens"]},
            {"prompt": "Ben has 10 cards and 2 pens.", "chosen": " 12 pens", "rejected": [" 1", " 2"]}]
    examples, k = tokenize_rows(rows, "mem", tok, 64, 32)
    b = collate(examples, tok.pad_token_id)
    S = 2 * (1 + k)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape and b["labels"].shape[0] == S
    for row in range(S):
        ex, j = examples[row % 2], row // 2  # chosen block, then K rejected blocks of P rows
        seq = ex.prompt + ex.responses[j]
        n = len(seq) - 1
        assert b["input_ids"][row, :n].tolist() == seq[:-1] and b["attention_mask"][row].sum() == n
        scored = b["labels"][row] != -100
        assert scored.sum() == len(ex.responses[j])  # exactly the response tokens (EOS included)
        assert b["labels"][row][scored].tolist() == ex.responses[j]
        assert not scored[:len(ex.prompt) - 1].any()
    sft = collate(examples, tok.pad_token_id, responses=[0])
    assert sft["labels"].shape[0] == 2
    left = collate_prompts(examples, tok.pad_token_id)
    assert left["attention_mask"][0, 0] == 0 and left["input_ids"][1, -len(examples[1].prompt):].tolist() == examples[1].prompt


def test_tokenizer_is_deterministic_and_exact():
    texts = ["Ann has 3 pens.", " 12 + 3 = 15. #### 15"]
    a, b = build_tokenizer(texts), build_tokenizer(list(reversed(texts)))
    assert a.get_vocab() == b.get_vocab()
    tok = builtin_tokenizer()
    rows, _ = load_rows(BUILTIN_DATASET, "test")
    for r in list(rows)[:50]:
        for text in (r["prompt"], r["chosen"], *r["rejected"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_final_answer():
    assert final_answer(" 3 + 4 = 7. #### 7") == "7"
    assert final_answer(" 1 2 ####  1 3 ") == "13"
    assert final_answer("no marker 5") == "nomarker5"


def test_sample_order_is_a_pure_function_of_position():
    full = sample_order(10, 3, 0, 35)
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]  # fresh permutation per epoch
    assert sample_order(10, 3, 17, 9) == full[17:26]  # resuming at any position continues the stream


# ----------------------------------------------------------------------------- the tokenizer check

def one_token_tokenizer():
    """A tokenizer that turns any text into one token (a word-level vocabulary without a
    pre-tokenizer: the whole text is one unknown word), as a wrongly reloaded tokenizer can."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_token_stats_of_a_good_tokenizer(tmp_path, tok):
    from mio_kernels.train.data import token_stats

    rows = [GOOD, {**GOOD, "rejected": [" 3 pens", " 5 pens"]}, GOOD]  # row 1: chosen = a rejected
    examples, _ = load_and_tokenize(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    stats = token_stats(examples, tok.eos_token_id)
    assert stats.rows == 3 and stats.identical == 1
    assert stats.response_max == stats.response_mean == len(tok(" 3 pens", add_special_tokens=False)["input_ids"])
    assert stats.prompt_max == len(tok(GOOD["prompt"])["input_ids"])
    assert stats.problem() is None
    assert "1 of 3 rows have a chosen identical to a rejected" in stats.summary()


def test_one_token_tokenizer_is_refused_suggesting_tokenizer(tmp_path, capsys):
    from mio_kernels.train.cli import main

    one_token_tokenizer().save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "prefs.jsonl", [GOOD] * 8)
    code = main(["--output-dir", str(tmp_path), "--name", "t", "--tokenizer", str(tmp_path / "tok"),
                 "--dataset", str(data), "--no-progress", "--steps", "1", "--sft-steps", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--tokenizer" in err and "at most 1 token" in err
    assert not (tmp_path / "t").exists()


def test_mostly_identical_pairs_are_refused(tmp_path, tok, capsys):
    from mio_kernels.train.data import token_stats

    rows = [{**GOOD, "rejected": [" 4 pens", " 3 pens"]}] * 3 + [GOOD]
    examples, _ = load_and_tokenize(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    assert "3 of 4 rows have a chosen response identical to a rejected" in token_stats(examples, tok.eos_token_id).problem()


def test_data_line_reports_tokens(tmp_path, capsys):
    from mio_kernels.train.cli import main

    code = main(["--output-dir", str(tmp_path), "--name", "t", "--no-progress", "--no-eval", "--no-plot",
                 "--no-save-final", "--max-train-examples", "16", "--steps", "1", "--sft-steps", "0",
                 "--batch-size", "4", "--tiny-hidden-size", "16", "--tiny-layers", "1", "--tiny-heads", "2"])
    assert code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "] data:" in l)
    assert "tokens per prompt mean" in line and "per response mean" in line
    assert "0 of 16 rows have a chosen identical to a rejected" in line
