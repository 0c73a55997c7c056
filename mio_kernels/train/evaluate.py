"""Forward-only passes: sequence log-probs (reference pass, evaluation) and greedy decoding.

Under FSDP every process must run the same number of forwards (each one all-gathers). The
log-prob pass splits the chunks over processes (padding the count) and sums the results; greedy
decoding runs the same prompts on every process, so all of them stop at the same step.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mio_kernels.objective import PreferenceConfig, metrics_dict, preference_objective
from mio_kernels.sequence import SequenceLogps
from mio_kernels.train.data import (Example, collate_prompts, collate_rows, contiguous_chunks, final_answer,
                                   packed_tokens)
from mio_kernels.train.model import HeadTasks
from mio_kernels.train.parallelize import Dist, all_reduce_sum, reshard_all
from mio_kernels.train.progress import Progress

Tick = Optional[Callable[[int], None]]  # progress callback: tick(units just done)


class ScoredResponses(NamedTuple):
    sums: Tensor    # [N, 1 + K] fp32 sequence log-prob sums (column 0 = chosen): what the op takes as ref_logps
    counts: Tensor  # [N, 1 + K] fp32 scored tokens of each response


def logprob_chunks(examples: Sequence[Example], batch_size: int, packing: Optional[int]) -> List[range]:
    """Consecutive examples per forward: `batch_size` of them (padded), or as many as fit in
    `packing` tokens (padding-free)."""
    if packing is None:
        return [range(lo, min(lo + batch_size, len(examples))) for lo in range(0, len(examples), batch_size)]
    return contiguous_chunks([packed_tokens(ex) for ex in examples], packing)


@torch.no_grad()
def sequence_logps(model, examples: Sequence[Example], tasks: HeadTasks, batch_size: int, pad_id: int,
                   d: Dist, packing: Optional[int] = None, tick: Tick = None) -> ScoredResponses:
    """Sequence log-prob sums and token counts of every response (on CPU). `packing`: the token
    budget of a packed forward (padding-free), or None for padded batches of `batch_size` prompts.
    tick(prompts) after each round of chunks (all processes' prompts)."""
    n, width = len(examples), len(examples[0].responses)
    out = torch.zeros(2, n, width, dtype=torch.float32, device=d.device)
    chunks = logprob_chunks(examples, batch_size, packing)
    rounds = -(-len(chunks) // d.world_size)
    for r in range(rounds):
        j = r * d.world_size + d.rank
        real = j < len(chunks)
        span = chunks[j] if real else chunks[0]  # a process without a chunk repeats chunk 0 and drops it
        chunk = examples[span.start:span.stop]
        batch = collate_rows(chunk, pad_id, packing is not None, tasks.cfg.ignore_index)
        scored = model(**{k: v.to(d.device) for k, v in batch.items()}, task=tasks.sequence_logps)
        if real:
            for i, key in enumerate(("policy_logps", "token_counts")):
                out[i, span.start:span.stop] = scored[key].float().view(width, len(chunk)).T
        if tick is not None:
            done = lambda rounds: chunks[rounds * d.world_size].start if rounds * d.world_size < len(chunks) else n
            tick(done(r + 1) - done(r))
    reshard_all(model)
    sums, counts = all_reduce_sum(out, d).cpu()
    return ScoredResponses(sums, counts)


@torch.no_grad()
def greedy_generate(model, examples: Sequence[Example], pad_id: int, eos_id: int, max_new_tokens: int,
                    batch_size: int, d: Dist, config=None, tick: Tick = None) -> List[List[int]]:
    """Greedy continuations (token ids, up to and excluding EOS) of each example's prompt,
    with a KV cache; left-padded batches, positions counted from each prompt's first token.
    tick(1) per decoding step; a batch that stops early ticks its remaining steps."""
    from transformers import DynamicCache

    results: List[List[int]] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        batch = {k: v.to(d.device) for k, v in collate_prompts(chunk, pad_id).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=config)
        finished = torch.zeros(len(chunk), dtype=torch.bool, device=d.device)
        generated = []
        for _ in range(max_new_tokens):
            if tick is not None:
                tick(1)
            out = model(ids, mask, task=HeadTasks.next_logits, position_ids=positions, cache=cache)  # cache: in place
            nxt = out["logits"].argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            generated.append(nxt)
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        if tick is not None:
            tick(max_new_tokens - len(generated))
        gen = torch.stack(generated, 1).tolist()
        for row in gen:
            results.append(row[:row.index(eos_id)] if eos_id in row else row)
    reshard_all(model)
    return results


def _objective_metrics(sums: Tensor, counts: Tensor, ref_sums: Optional[Tensor],
                       cfg: PreferenceConfig) -> Dict[str, float]:
    """The op's own metrics (mio_kernels.objective) of [N, 1 + K] log-prob sums, laid out as its rows."""
    rows = sums.T.reshape(-1).double()  # chosen block, then K rejected blocks
    counts = counts.T.reshape(-1).double()
    scale = 1.0 / counts.clamp(min=1.0) if cfg.length_normalized else torch.ones_like(rows)
    ref = None if cfg.reference_free else ref_sums.T.reshape(-1).double()
    metrics = preference_objective(SequenceLogps(rows * scale, rows, counts, scale), ref, cfg).metrics
    return {k: v.item() for k, v in metrics_dict(metrics).items() if k != "nll"}


def preference_metrics(sums: Tensor, ref_sums: Optional[Tensor], cfg: PreferenceConfig,
                       counts: Optional[Tensor] = None) -> Dict[str, float]:
    """Held-out preference metrics from [N, 1 + K] log-prob sums (column 0 = chosen) and, for a
    length-normalised loss, the [N, 1 + K] token counts.

    rewards/*: the op's metrics (rewards/accuracies: r_w > max_k r_k; 0 at the reference itself,
    where every reward is 0); logps/accuracies: the model's own ranking, l_w > max_k l_k (the
    same metric without a reference and beta = 1).
    """
    if counts is None:
        if cfg.length_normalized:
            raise ValueError("preference_metrics: a length-normalised loss needs the token counts (counts=)")
        counts = torch.ones_like(sums)
    cfg = dataclasses.replace(cfg, sft_weight=0.0)
    result = _objective_metrics(sums, counts, ref_sums, cfg)
    own = _objective_metrics(sums, counts, None, dataclasses.replace(cfg, reference_free=True, beta=1.0))
    result["logps/accuracies"] = own["rewards/accuracies"]
    return result


def evaluate(model, examples: Sequence[Example], ref_logps: Optional[Tensor], tokenizer, tasks: HeadTasks,
             batch_size: int, max_new_tokens: int, d: Dist, config=None, progress: Optional[Progress] = None,
             when: str = "", packing: Optional[int] = None) -> Tuple[Dict[str, float], List[str]]:
    """(metrics, greedy continuations as text) on held-out examples; `progress` shows its two
    phases (scoring, generation) as "eval <when>: ...". Log-probs are packed under `packing`
    tokens per forward (None: padded); greedy decoding runs left-padded prompt batches.

    exact_match: the text after the last '####' of the greedy continuation equals the chosen
    response's (whitespace ignored); see data.final_answer.
    """
    pad, progress = tokenizer.pad_token_id, progress or Progress.silent()
    with progress.phase(f"eval {when}: log-probs", len(examples), "prompt") as ph:
        scored = sequence_logps(model, examples, tasks, batch_size, pad, d, packing=packing, tick=ph.update)
    result = preference_metrics(scored.sums, ref_logps, tasks.cfg, scored.counts)
    decode_steps = -(-len(examples) // batch_size) * max_new_tokens
    with progress.phase(f"eval {when}: greedy generation", decode_steps, "decoding step") as ph:
        gens = greedy_generate(model, examples, pad, tokenizer.eos_token_id, max_new_tokens, batch_size, d, config,
                               tick=ph.update)
        ph.summary = f"{len(examples)} prompts, at most {max_new_tokens} new tokens each"
    texts = tokenizer.batch_decode(gens, skip_special_tokens=True)
    result["exact_match"] = sum(is_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples)
    result["examples"] = len(examples)
    return result, texts


def is_correct(generation: str, example: Example) -> bool:
    """Exact match: the generation's final answer (data.final_answer) is the chosen response's."""
    return final_answer(generation) == example.answer


def write_generations(path: Path, examples: Sequence[Example], texts: Sequence[str]) -> None:
    """One JSON line per held-out prompt: prompt, reference (the chosen response) and its final
    answer, the greedy generation and its final answer, correct (exact match)."""
    with open(path, "w") as f:
        for ex, text in zip(examples, texts):
            record = {"prompt": ex.prompt_text, "reference": ex.chosen_text, "reference_answer": ex.answer,
                      "generation": text, "answer": final_answer(text), "correct": is_correct(text, ex)}
            f.write(json.dumps(record) + "\n")
