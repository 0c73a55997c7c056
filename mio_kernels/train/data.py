"""Preference data: loading, validation, tokenisation, collation into the fused loss's row layout.

Rows are in TRL's preference format: `prompt` (str), `chosen` (str), `rejected` (str, or a list
of K str). Every row is validated; a malformed one raises DatasetRowError naming the source, the
row and the field. Nothing is dropped silently.

Tokenisation (per row): prompt -> tokenizer(prompt) (with the tokenizer's special tokens, e.g.
BOS); each response -> tokenizer(response, add_special_tokens=False) + [EOS]. Prompt and
response are tokenised separately, as TRL does, so the boundary is exact.

Truncation rules (stated once, applied to every row; truncated rows are counted and logged):
  1. if len(prompt) + len(longest response) > max_length, the prompt keeps its LAST
     max_prompt_length tokens (left truncation: the question at its end survives);
  2. each response is then cut on the right to max_length - len(prompt) tokens (it may lose
     its EOS). max_prompt_length < max_length, so every response keeps at least one token.

Batch layout (what fused_mio_loss expects): for P prompts with K negatives, S = P * (1 + K)
rows: the P chosen sequences, then K blocks of P rejected ones. Each row is prompt + response,
right-padded; input_ids = seq[:-1], labels = seq[1:] with prompt and padding positions set to
ignore_index, so labels[:, t] is the token that position t predicts.

Padding-free layout (`collate_packed`): the same S sequences, in the same order, concatenated into
one row of N tokens: input_ids and position_ids [1, N] (positions restart at 0 at every sequence,
from which transformers builds a block-diagonal causal mask), labels [N] shifted within each
sequence and cu_seqlens [S+1]. Each sequence is exactly its padded row without the padding: its
final token (EOS) is no input, so every position's target lies in its own sequence and no label
crosses into the next one (the layout that feeds all L tokens would set the last one's label to
ignore_index instead, and compute one more token per sequence). Sequence i is tokens
cu_seqlens[i]:cu_seqlens[i+1]. `pack_by_tokens` groups prompts (each with all its responses: a
prompt is never split) into micro-batches under a token budget.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

BUILTIN_DATASET = "builtin:arithmetic"
FIELDS = ("prompt", "chosen", "rejected")


class DatasetRowError(ValueError):
    """A preference row that cannot be used; the message names the source, row and field."""

    def __init__(self, source: str, row: int, field: str, problem: str):
        self.source, self.row, self.field = source, row, field
        super().__init__(f"{source}: row {row}: field {field!r} {problem}")


@dataclass
class Example:
    """One tokenised prompt with its responses ([chosen, rejected_1..K]), token ids as lists."""

    prompt: List[int]
    responses: List[List[int]]
    answer: str          # the chosen response's final answer (exact-match target)
    truncated: bool = False
    prompt_text: str = ""  # the row's prompt and chosen response as given (for generations_*.jsonl)
    chosen_text: str = ""


# ----------------------------------------------------------------------------- loading

def _builtin_path(split: str) -> Path:
    from mio_kernels.data import ARITHMETIC_TEST, ARITHMETIC_TRAIN

    paths = {"train": ARITHMETIC_TRAIN, "test": ARITHMETIC_TEST}
    if split not in paths:
        raise ValueError(f"{BUILTIN_DATASET} has splits {sorted(paths)}, not {split!r}")
    return paths[split]


def load_rows(source: str, split: str = "train") -> Tuple[Sequence[dict], str]:
    """Rows of a preference dataset (a `datasets.Dataset` or a list of dicts) and a display name.

    `source`: BUILTIN_DATASET, a local .json/.jsonl/.parquet file, or a dataset name for
    `datasets.load_dataset` (a hub id needs network access).
    """
    import datasets

    datasets.disable_progress_bars()  # the trainer logs one line per dataset instead

    if source == BUILTIN_DATASET:
        path = _builtin_path(split)
        return _load_file(path, "json"), f"{BUILTIN_DATASET}[{split}]"
    path = Path(source)
    if path.is_file():
        ext = path.suffix.lower()
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"{source}: unsupported file type {ext!r} (use .json, .jsonl or .parquet)")
        return _load_file(path, builder), str(path)
    return datasets.load_dataset(source, split=split), f"{source}[{split}]"


def _load_file(path: Path, builder: str):
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        if builder != "json" or _plain_text_columns(ds):
            return ds
    except Exception as err:
        if builder != "json":
            raise ValueError(f"{path}: could not be read as a preference dataset: {err}") from err
    # Arrow refuses a column whose type changes between rows (e.g. `rejected` a string in one
    # row, a list or a number in another), or `datasets` types it as Json and re-parses the
    # strings in it (" 4" becomes 4): read the rows ourselves, exactly, so a bad one gets named.
    rows = list(_json_rows(path))
    for i, row in enumerate(rows):
        validate_row(row, i, str(path))
    return rows


def _plain_text_columns(ds) -> bool:
    """Whether prompt/chosen are string columns and rejected a string or list-of-string column."""
    from datasets import Value

    feats = ds.features
    text = lambda f: isinstance(f, Value) and f.dtype in ("string", "large_string")
    rej = feats.get("rejected")
    return (all(text(feats.get(k)) for k in ("prompt", "chosen"))
            and (text(rej) or text(getattr(rej, "feature", None))))


def _json_rows(path: Path):
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DatasetRowError(str(path), len(rows), "<json>", f"is not valid JSON (line {line_no}: {err})")
    for row in rows:
        yield row


# ----------------------------------------------------------------------------- validation

def validate_row(row, index: int, source: str) -> Tuple[str, str, List[str]]:
    """(prompt, chosen, [rejected...]) of one row, or DatasetRowError naming what is wrong."""
    if not isinstance(row, dict):
        raise DatasetRowError(source, index, "<row>", f"must be an object with fields {FIELDS}, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row or row[field] is None:
            raise DatasetRowError(source, index, field, "is missing")
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    for field, value in (("prompt", prompt), ("chosen", chosen)):
        if isinstance(value, list) and value and isinstance(value[0], dict):
            raise DatasetRowError(source, index, field, "is conversational (a list of messages); "
                                  "apply the chat template to get text first")
        if not isinstance(value, str):
            raise DatasetRowError(source, index, field, f"must be a string, got {type(value).__name__}")
    if not chosen.strip():
        raise DatasetRowError(source, index, "chosen", "is empty")
    if isinstance(rejected, str):
        rejected = [rejected]
    if not isinstance(rejected, list) or not rejected:
        raise DatasetRowError(source, index, "rejected",
                              f"must be a string or a non-empty list of strings, got {rejected!r:.60}")
    for k, r in enumerate(rejected):
        if not isinstance(r, str):
            raise DatasetRowError(source, index, "rejected", f"item {k} must be a string, got {type(r).__name__}")
        if not r.strip():
            raise DatasetRowError(source, index, "rejected", f"item {k} is empty")
    return prompt, chosen, list(rejected)


def final_answer(text: str) -> str:
    """The exact-match key of a response: the text after its last '####' (else all of it),
    with all whitespace removed."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    return "".join(tail.split())


# ----------------------------------------------------------------------------- tokenisation

def tokenize_rows(rows: Sequence[dict], source: str, tokenizer, max_length: int, max_prompt_length: int,
                  num_negatives: Optional[int] = None, max_rows: Optional[int] = None) -> Tuple[List[Example], int]:
    """Validate and tokenise every row -> (examples, K). K = num_negatives, or the rows' own K
    (which must then be the same for every row); rows with fewer than K rejected are errors."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end in one")
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    parsed = [validate_row(rows[i], i, source) for i in range(n)]
    if not parsed:
        raise ValueError(f"{source}: no rows")
    k = num_negatives if num_negatives is not None else len(parsed[0][2])
    for i, (_, _, rejected) in enumerate(parsed):
        if len(rejected) < k or (num_negatives is None and len(rejected) != k):
            raise DatasetRowError(source, i, "rejected", f"has {len(rejected)} responses; every row needs "
                                  f"{k} (row 0 has {len(parsed[0][2])}; set num_negatives to use fewer)")
    prompts = tokenizer([p for p, _, _ in parsed], add_special_tokens=True)["input_ids"]
    responses = [[c] + r[:k] for _, c, r in parsed]
    flat = tokenizer([t for rs in responses for t in rs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for i, (prompt_ids, (prompt, chosen, _)) in enumerate(zip(prompts, parsed)):
        if not prompt_ids:
            raise DatasetRowError(source, i, "prompt", "tokenizes to nothing (the first response token "
                                  "would have no context)")
        resp = [list(ids) + [eos] for ids in flat[i * (1 + k):(i + 1) * (1 + k)]]
        prompt_ids = list(prompt_ids)
        truncated = len(prompt_ids) + max(map(len, resp)) > max_length
        if truncated:
            prompt_ids = prompt_ids[-max_prompt_length:]
            resp = [r[:max_length - len(prompt_ids)] for r in resp]
        examples.append(Example(prompt_ids, resp, final_answer(chosen), truncated, prompt, chosen))
    return examples, k


@dataclass
class TokenStats:
    """What the tokenizer made of a dataset: tokens per prompt and per response (the tokenizer's
    own, without the EOS appended here, after truncation), and the rows whose chosen response is,
    token for token, one of its rejected ones (such a row has no preference to learn)."""

    rows: int
    prompt_mean: float
    prompt_max: int
    response_mean: float
    response_max: int
    identical: int

    def summary(self) -> str:
        return (f"tokens per prompt mean {self.prompt_mean:.1f} max {self.prompt_max}, per response mean "
                f"{self.response_mean:.1f} max {self.response_max}; {self.identical} of {self.rows} rows have a "
                "chosen identical to a rejected after tokenization")

    def problem(self) -> Optional[str]:
        """Why the tokenization cannot be right (most rows' chosen = a rejected, or every response
        at most one token), or None."""
        if self.response_max <= 1:
            return f"every response tokenizes to at most {self.response_max} token"
        if self.identical * 2 > self.rows:
            return (f"{self.identical} of {self.rows} rows have a chosen response identical to a rejected one "
                    f"after tokenization (responses: mean {self.response_mean:.1f} tokens, max {self.response_max})")
        return None


def token_stats(examples: Sequence[Example], eos_id: int) -> TokenStats:
    """TokenStats of tokenised examples (`eos_id`: the EOS tokenize_rows appends to each response)."""
    own = lambda r: len(r) - (1 if r and r[-1] == eos_id else 0)  # noqa: E731
    prompts = [len(ex.prompt) for ex in examples]
    responses = [own(r) for ex in examples for r in ex.responses]
    identical = sum(any(r == ex.responses[0] for r in ex.responses[1:]) for ex in examples)
    return TokenStats(len(examples), sum(prompts) / max(len(prompts), 1), max(prompts, default=0),
                      sum(responses) / max(len(responses), 1), max(responses, default=0), identical)


# ----------------------------------------------------------------------------- collation

def _sequences(examples: Sequence[Example], responses: Optional[Sequence[int]]):
    """(token lists, prompt lengths) of the rows, in the loss's order: blocks of P, by response."""
    if responses is None:
        responses = range(len(examples[0].responses))
    seqs, prompt_lens = [], []
    for j in responses:
        for ex in examples:
            seqs.append(ex.prompt + ex.responses[j])
            prompt_lens.append(len(ex.prompt))
    return seqs, prompt_lens


def collate(examples: Sequence[Example], pad_id: int, ignore_index: int = -100,
            responses: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """Batch of P examples -> input_ids, attention_mask, labels [S, L] (int64), S = P * len(responses).

    `responses` picks which responses, in order, as blocks of P rows (default: all, chosen
    first, i.e. the fused loss's layout; [0] gives the chosen rows alone, for SFT).
    """
    seqs, prompt_lens = _sequences(examples, responses)
    width = max(map(len, seqs)) - 1
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, lp) in enumerate(zip(seqs, prompt_lens)):
        seq_t = torch.tensor(seq, dtype=torch.long)
        n = len(seq) - 1
        input_ids[i, :n] = seq_t[:-1]
        attention_mask[i, :n] = 1
        labels[i, lp - 1:n] = seq_t[lp:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: Sequence[Example], ignore_index: int = -100,
                   responses: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """The rows of `collate`, same order, as one packed row: input_ids, position_ids [1, N] (int64),
    labels [N] (int64), cu_seqlens [S+1] (int32); N = sum over rows of (length - 1), no padding."""
    seqs, prompt_lens = _sequences(examples, responses)
    lengths = torch.tensor([len(seq) - 1 for seq in seqs], dtype=torch.long)
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    input_ids = torch.tensor([t for seq in seqs for t in seq[:-1]], dtype=torch.long)
    labels = torch.full_like(input_ids, ignore_index)
    for seq, lp, start in zip(seqs, prompt_lens, cu_seqlens.tolist()):
        labels[start + lp - 1:start + len(seq) - 1] = torch.tensor(seq[lp:], dtype=torch.long)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    position_ids = torch.arange(len(input_ids)) - starts
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "labels": labels,
            "cu_seqlens": cu_seqlens}


def collate_rows(examples: Sequence[Example], pad_id: int, packed: bool, ignore_index: int = -100,
                 responses: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """`collate_packed` (padding-free) or `collate` (padded) of the same rows."""
    if packed:
        return collate_packed(examples, ignore_index, responses)
    return collate(examples, pad_id, ignore_index, responses)


def packed_tokens(example: Example, responses: Optional[Sequence[int]] = None) -> int:
    """Tokens `example` brings to a packed row (prompt + response - 1, for each response used)."""
    picked = example.responses if responses is None else [example.responses[j] for j in responses]
    return sum(len(example.prompt) + len(r) - 1 for r in picked)


def pack_by_tokens(sizes: Sequence[int], budget: int, min_bins: int = 0) -> List[List[int]]:
    """Group items (prompts, of `sizes` tokens each) into micro-batches of at most `budget` tokens
    -> lists of item positions, each in ascending order.

    Length-grouped: items are placed longest first, each into the first micro-batch with room
    (first-fit decreasing; an item over the budget gets one of its own). Then, while there are
    fewer than `min_bins` micro-batches (so that every process runs as many forwards as the
    busiest one), the one with the most tokens is halved. Deterministic: a function of the sizes.
    """
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fit = next((b for b, r in enumerate(room) if sizes[i] <= r), None)
        if fit is None:
            bins.append([])
            room.append(budget)
            fit = len(bins) - 1
        bins[fit].append(i)
        room[fit] -= sizes[i]
    if min_bins > len(sizes):
        raise ValueError(f"cannot split {len(sizes)} items into {min_bins} non-empty micro-batches")
    while len(bins) < min_bins:
        b = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: sum(sizes[i] for i in bins[b]))
        bins[b:b + 1] = [bins[b][0::2], bins[b][1::2]]  # alternate: the halves get similar tokens
    return [sorted(b) for b in bins]


def contiguous_chunks(sizes: Sequence[int], budget: int) -> List[range]:
    """Consecutive items under a token budget each (an item over it alone): forward-only passes."""
    chunks, lo, used = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and used + n > budget:
            chunks.append(range(lo, i))
            lo, used = i, 0
        used += n
    if sizes:
        chunks.append(range(lo, len(sizes)))
    return chunks


def collate_prompts(examples: Sequence[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    """Left-padded prompts for generation: input_ids, attention_mask [P, L]."""
    width = max(len(ex.prompt) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        input_ids[i, width - len(ex.prompt):] = torch.tensor(ex.prompt, dtype=torch.long)
        attention_mask[i, width - len(ex.prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------- order

def sample_order(num_examples: int, seed: int, start: int, count: int) -> List[int]:
    """Items [start, start + count) of the endless stream of epochs, each a fresh permutation
    seeded by (seed, epoch). The data position is just `start`, so resuming is exact."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, num_examples)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_examples, generator=g).tolist()
        take = min(count - len(out), num_examples - offset)
        out += perm[offset:offset + take]
        pos += take
    return out
