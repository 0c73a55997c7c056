"""The shipped arithmetic preference dataset: reproducible, valid, correctly labelled, split."""
from __future__ import annotations

import json
import re

import pytest

from mio_kernels.data import ARITHMETIC_TEST, ARITHMETIC_TRAIN, make_arithmetic

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data():
    return {"train": rows(ARITHMETIC_TRAIN), "test": rows(ARITHMETIC_TEST)}


def test_generator_reproduces_shipped_files():
    assert make_arithmetic.main(["--check"]) == 0


def test_sizes_and_split(data):
    assert len(data["train"]) == make_arithmetic.NUM_TRAIN and len(data["test"]) == make_arithmetic.NUM_TEST
    assert ARITHMETIC_TRAIN.stat().st_size + ARITHMETIC_TEST.stat().st_size < 2_000_000
    train_prompts = {r["prompt"] for r in data["train"]}
    assert len(train_prompts) == len(data["train"])
    assert not train_prompts & {r["prompt"] for r in data["test"]}


def solve(prompt: str) -> int:
    """Recompute the answer from the question text alone."""
    n = [int(x) for x in re.findall(r"\d+", prompt)]
    if "more and then gives" in prompt:
        return n[0] + n[1] - n[2]
    if "in each box" in prompt:
        return n[0] + n[1] * n[2]
    if "more" in prompt:
        return n[0] + n[1]
    if "gives" in prompt:
        return n[0] - n[1]
    return n[0] * n[1]


def final(text: str) -> int:
    return int(text.rsplit("####", 1)[1])


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels(data, split):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for r in data[split]:
        answer = solve(r["prompt"])
        assert r["answer"] == str(answer) == str(final(r["chosen"]))
        steps = STEP.findall(r["chosen"])
        assert steps and all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps)  # chosen: all right
        assert len(r["rejected"]) == make_arithmetic.NUM_REJECTED == len(set(r["rejected"]))
        for rej in r["rejected"]:
            assert final(rej) != answer  # every rejected response reaches a wrong answer
            assert rej.startswith(" ") and "####" in rej
