"""Generate the shipped arithmetic reasoning-preference dataset (deterministic).

    python -m mio_kernels.data.make_arithmetic            # rewrites the shipped files
    python -m mio_kernels.data.make_arithmetic --check    # exit 1 if they differ from the generator

Each row is in TRL's preference format plus one extra column:

    {"prompt": "Ann has 17 pens. She gets 6 more pens. How many pens does Ann have now?",
     "chosen": " 17 + 6 = 23. #### 23",
     "rejected": [" 17 + 6 = 13. #### 13", " 17 - 6 = 11. #### 11", " 17 + 6 = 23. #### 24"],
     "answer": "23"}

`chosen` is a correct worked solution; each of the K = 3 `rejected` responses is a plausible
wrong one: two with an error in the working (a dropped carry or borrow, a slip of one or ten,
the wrong operation, a skipped step; carried consistently through the later steps) and one
with correct working but a misreported final answer. The final answer follows "####" (GSM8K style) so exact match can compare it.

Two files, split by construction (no prompt appears in both):
    arithmetic_prefs_train.jsonl  (3000 rows)   arithmetic_prefs_test.jsonl  (300 rows)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

DATA_DIR = Path(__file__).resolve().parent
TRAIN_FILE = DATA_DIR / "arithmetic_prefs_train.jsonl"
TEST_FILE = DATA_DIR / "arithmetic_prefs_test.jsonl"
NUM_TRAIN, NUM_TEST, NUM_REJECTED, SEED = 3000, 300, 3, 1234

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eva", "She"),
         ("Finn", "He"), ("Gia", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jack", "He"),
         ("Kim", "She"), ("Leo", "He")]
ITEMS = ["apples", "pens", "cards", "books", "shells", "stickers", "coins", "marbles"]

# A plan is a list of (x, op, y) where x or y may be PREV: the previous step's result.
# Solving it gives steps (x, op, y, result); a wrong solution changes one step's result (or
# operation) and carries the wrong value through the later steps, as a student would.
PREV = "prev"
Plan = List[Tuple[object, str, object]]
Step = Tuple[int, str, int, int]
OPS: Dict[str, Callable[[int, int], int]] = {"+": lambda x, y: x + y, "-": lambda x, y: x - y,
                                             "*": lambda x, y: x * y}


def solve(plan: Plan, at: int = -1, wrong: Callable[[int, str, int], Tuple[str, int]] = None) -> List[Step]:
    """Steps of `plan`; step `at` gets (op, result) = wrong(x, op, y) instead of the right ones."""
    steps: List[Step] = []
    for i, (x, op, y) in enumerate(plan):
        x = steps[-1][3] if x == PREV else x
        y = steps[-1][3] if y == PREV else y
        op2, r = wrong(x, op, y) if i == at else (op, OPS[op](x, y))
        steps.append((x, op2, y, r))
    return steps


def render(steps: List[Step], answer: int) -> str:
    body = " ".join(f"{x} {op} {y} = {r}." for x, op, y, r in steps)
    return f" {body} #### {answer}"


def no_carry_add(x: int, y: int) -> int:
    """Digit-wise sum that forgets every carry (a classic slip)."""
    out, place = 0, 1
    while x or y:
        out += ((x % 10 + y % 10) % 10) * place
        x, y, place = x // 10, y // 10, place * 10
    return out


def no_borrow_sub(x: int, y: int) -> int:
    """Digit-wise |difference| that forgets every borrow."""
    out, place = 0, 1
    while x or y:
        out += abs(x % 10 - y % 10) * place
        x, y, place = x // 10, y // 10, place * 10
    return out


def slips(x: int, op: str, y: int) -> List[int]:
    """Wrong results a student plausibly writes for `x op y`, most plausible first."""
    right = OPS[op](x, y)
    if op == "+":
        cands = [no_carry_add(x, y), right + 10, right - 10]
    elif op == "-":
        cands = [no_borrow_sub(x, y), right + 10, right - 10]
    else:
        cands = [right + x, right - x, right + y]
    cands += [right + 1, right - 1]
    return [c for c in dict.fromkeys(cands) if c != right and c >= 0]


def wrong_solutions(plan: Plan, rng: random.Random) -> List[Tuple[List[Step], int]]:
    """Plausible wrong solutions of `plan`, best mix first: (steps, reported answer).

    Working errors (a slip in a step, the wrong operation, a skipped step) come first, shuffled,
    with one right-working-misreported-answer among the first NUM_REJECTED, so each row's
    rejected set mixes the kinds of mistake.
    """
    right = solve(plan)
    working: List[List[Step]] = []
    for i, (x, op, y, _) in enumerate(right):
        for r in slips(x, op, y):
            working.append(solve(plan, i, lambda x, op, y, r=r: (op, r)))
        other = {"+": "-", "-": "+", "*": "+"}[op]
        working.append(solve(plan, i, lambda x, op, y, o=other: (o, OPS[o](x, y))))
    wrong = [(s, s[-1][3]) for s in working if all(st[3] >= 0 for st in s)]
    if len(right) > 1:  # stops after the first step
        wrong.append((right[:1], right[0][3]))
    answer = right[-1][3]
    misreported = [(right, r) for r in dict.fromkeys((answer + 1, answer - 1, int(str(answer)[::-1])))
                   if r >= 0 and r != answer]
    rng.shuffle(wrong)
    rng.shuffle(misreported)
    first = wrong[:NUM_REJECTED - 1] + misreported[:1]
    rng.shuffle(first)
    return first + wrong[NUM_REJECTED - 1:] + misreported[1:]


# Operand ranges (inclusive) per problem kind; small enough that a tiny model learns most of the
# facts in its SFT warm-up and its mistakes look like the rejected responses.
R = {"add": (1, 20), "sub": (5, 30), "mul": (2, 9), "mul_add": (2, 20, 2, 5), "add_sub": (2, 15)}


def problem(rng: random.Random) -> Tuple[str, Plan]:
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(*R["add"]), rng.randint(*R["add"])
        text = f"{name} has {a} {item}. {pron} gets {b} more {item}. How many {item} does {name} have now?"
        plan = [(a, "+", b)]
    elif kind == 1:
        a = rng.randint(*R["sub"])
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {item}. {pron} gives {b} {item} to {other}. How many {item} does {name} have left?"
        plan = [(a, "-", b)]
    elif kind == 2:
        a, b = rng.randint(*R["mul"]), rng.randint(*R["mul"])
        text = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?"
        plan = [(a, "*", b)]
    elif kind == 3:
        lo, hi, blo, bhi = R["mul_add"]
        a, b, c = rng.randint(lo, hi), rng.randint(blo, bhi), rng.randint(blo, bhi)
        text = (f"{name} has {a} {item}. {pron} buys {b} boxes with {c} {item} in each box. "
                f"How many {item} does {name} have now?")
        plan = [(b, "*", c), (a, "+", PREV)]
    else:
        a, b = rng.randint(*R["add_sub"]), rng.randint(*R["add_sub"])
        c = rng.randint(1, a + b - 1)
        text = (f"{name} has {a} {item}. {pron} gets {b} more and then gives {c} to {other}. "
                f"How many {item} does {name} have left?")
        plan = [(a, "+", b), (PREV, "-", c)]
    return text, plan


def make_rows(n: int, rng: random.Random, seen: set) -> List[dict]:
    rows = []
    while len(rows) < n:
        prompt, plan = problem(rng)
        if prompt in seen:
            continue
        steps = solve(plan)
        answer = steps[-1][3]
        chosen = render(steps, answer)
        rejected: List[str] = []
        for wsteps, wanswer in wrong_solutions(plan, rng):
            text = render(wsteps, wanswer)
            if wanswer != answer and text not in rejected:
                rejected.append(text)
            if len(rejected) == NUM_REJECTED:
                break
        if len(rejected) < NUM_REJECTED:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "answer": str(answer)})
    return rows


def generate(train_file: Path = TRAIN_FILE, test_file: Path = TEST_FILE) -> Dict[Path, str]:
    """File path -> exact file contents."""
    rng, seen = random.Random(SEED), set()
    test = make_rows(NUM_TEST, rng, seen)
    train = make_rows(NUM_TRAIN, rng, seen)
    dump = lambda rows: "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    return {train_file: dump(train), test_file: dump(test)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        stale = [p.name for p, text in files.items() if not p.exists() or p.read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "shipped files match the generator")
        return 1 if stale else 0
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path.name}: {text.count(chr(10))} rows, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
