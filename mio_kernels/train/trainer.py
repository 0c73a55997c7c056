"""The training loop: SFT warm-up -> reference log-probs -> preference training -> evaluation.

    trainer = Trainer(cfg); trainer.run()

Read top to bottom: `run` is the whole job, `train_phase` one phase's steps (log, checkpoint),
`train_step` one optimizer step = `forward_backward` (micro-batches) + `optimizer_step` (clip,
step, zero). Host syncs happen only at log time, in evaluation and in checkpoints. What a
checkpoint holds is `TrainState` (state.py); reference scoring is reference.py, evaluation
evaluate.py, the model and what its LM head computes model.py.

Loss scaling under gradient accumulation (and across processes): the preference loss of a
micro-batch is a mean over its prompts, so it is weighted by (its prompts / prompts in the whole
step); the SFT loss is a sum of token NLLs divided by the scored tokens of the whole step (known
on every process without communication: every process knows the step's sample indices). The
weighted micro-batch losses then add up, over micro-batches and processes, to the loss of one
big batch, whatever their sizes and token counts. Padding-free (the default) changes only how a
step's prompts are grouped into forwards (`micro_batches`: one packed row each, under a token
budget), never which prompts a step has: same loss and gradients as padded, to fp32 rounding.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch

from mio_kernels.backends import resolve_backend
from mio_kernels.objective import METRIC_NAMES
from mio_kernels.train import checkpoint as ckpt
from mio_kernels.train.config import ConfigError, TrainConfig, option_warnings
from mio_kernels.train.data import (Example, collate_rows, load_rows, pack_by_tokens, packed_tokens, sample_order,
                                   token_stats, tokenize_rows)
from mio_kernels.train.evaluate import evaluate, sequence_logps, write_generations
from mio_kernels.train.metrics import MetricsLog
from mio_kernels.train.model import HeadTasks, PreferenceModel, check_packed_attention, load_model_and_tokenizer
from mio_kernels.transform import head_transform
from mio_kernels.train.parallelize import (Dist, all_reduce_sum, barrier, full_state_dict, init_distributed,
                                           parallelize, reshard_all, set_head_kept_gathered)
from mio_kernels.train.progress import Progress, duration
from mio_kernels.train.reference import batch_reference, frozen_copy, score_table
from mio_kernels.train.run_dir import plan_run, run_identity
from mio_kernels.train.state import TrainState

SFT_METRICS = ("loss",)
PHASE_TITLES = {"sft": "SFT warm-up", "pref": "preference training"}
SHOWN_METRICS = ("loss", "rewards/margins", "rewards/accuracies")  # on the progress bar and summary line


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class PhaseSpec:
    name: str
    steps: int
    batch_size: int
    micro_batch_size: int
    lr: float
    warmup: int
    seed_offset: int  # different data order per phase


def make_phases(cfg: TrainConfig, world_size: int) -> Dict[str, PhaseSpec]:
    phases = {
        "sft": PhaseSpec("sft", cfg.resolved_sft_steps(), cfg.sft_batch_size, cfg.sft_micro_batch_size,
                         cfg.sft_lr, cfg.sft_warmup_steps, 0),
        "pref": PhaseSpec("pref", cfg.steps, cfg.batch_size, cfg.micro_batch_size, cfg.resolved_lr(),
                          cfg.warmup_steps, 1),
    }
    for spec in phases.values():
        if spec.steps and spec.batch_size % world_size:
            raise ValueError(f"{spec.name} batch size {spec.batch_size} must be a multiple of the "
                             f"{world_size} processes")
    return phases


def load_examples(cfg: TrainConfig, tok, vocab: int):
    """(training examples, K, held-out examples, source, TokenStats of the training examples), tokenised;
    token ids checked against the vocabulary; a tokenization that leaves nothing to prefer (most
    rows' chosen = a rejected, or one-token responses) is refused, suggesting --tokenizer."""
    rows, src = load_rows(cfg.dataset, cfg.dataset_split)
    train, k = tokenize_rows(rows, src, tok, cfg.max_length, cfg.max_prompt_length, cfg.num_negatives,
                             cfg.max_train_examples)
    stats = token_stats(train, tok.eos_token_id)
    problem = stats.problem()
    if problem is not None:
        raise ValueError(f"{src}: {problem}: the tokenizer ({type(tok).__name__}, from "
                         f"{cfg.tokenizer or cfg.model}) does not split these responses into their words; "
                         "pass the model's own tokenizer with --tokenizer PATH")
    held_out: List[Example] = []
    if cfg.resolved_eval_dataset() is not None:
        erows, esrc = load_rows(cfg.resolved_eval_dataset(), cfg.eval_split)
        held_out, _ = tokenize_rows(erows, esrc, tok, cfg.max_length, cfg.max_prompt_length, k,
                                    cfg.max_eval_examples)
    for name, examples in (("training", train), ("evaluation", held_out)):
        top = max((max(ex.prompt + [t for r in ex.responses for t in r]) for ex in examples), default=0)
        if top >= vocab:
            raise ValueError(f"{name} data has token id {top} but the model's LM head has {vocab} rows: "
                             "tokenizer and model do not match")
    return train, k, held_out, src, stats


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.d = d = init_distributed(cfg.device)
        self.progress = Progress(cfg.progress, d.is_main)  # before loading: it may silence library bars
        try:
            resolve_backend(cfg.backend, d.device)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"--backend {cfg.backend}: {err}") from None
        self.plan = plan_run(cfg)  # refuses a run directory it must not use, before any work
        if cfg.resolved_threads() is not None and d.device.type == "cpu":
            torch.set_num_threads(cfg.resolved_threads())
        seed_everything(cfg.seed)  # same seed on every process: identical init before sharding
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"

        tiny = dict(hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads,
                    intermediate_size=cfg.tiny_intermediate_size, max_positions=max(256, cfg.max_length))
        lm, self.tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer, cfg.dtype, tiny)
        self.lm = lm.to(d.device)
        if cfg.padding_free:  # before sharding: the probe runs the whole model
            check_packed_attention(self.lm)
        self.packing = cfg.max_tokens_per_micro_batch if cfg.padding_free else None
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        self.train, self.k, self.eval_examples, src, stats = load_examples(cfg, self.tok, vocab)
        self.log(f"data: {len(self.train)} training prompts from {src} (K={self.k} rejected each, "
                 f"{sum(ex.truncated for ex in self.train)} truncated to max_length={cfg.max_length}; "
                 f"{stats.summary()}), {len(self.eval_examples)} held out")

        self.bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
        if d.world_size > 1:
            info = self.distributed_info()
            self.log(f"distributed: {info['processes']} processes, backend {info['backend']}, FSDP2 (each decoder "
                     f"block and the LM head sharded over the processes), device {info['device']}")
        self.model = parallelize(PreferenceModel(self.lm), d, self.bf16, cfg.activation_checkpointing)
        loss_cfg = replace(cfg.preference_config(self.k), **head_transform(self.lm))
        self.tasks = HeadTasks(loss_cfg, cfg.backend)
        self.pad_id = self.tok.pad_token_id
        self.phases = make_phases(cfg, d.world_size)
        self.state = TrainState(self.model)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", d.is_main)
        if self.plan.resume_from is not None:
            self.check_reference_coverage(json.loads((self.plan.resume_from / ckpt.STATE_FILE).read_text()))
        for line in option_warnings(cfg):  # once the set-up succeeded: an error stays one line
            self.progress.warn(line)

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        self.progress.log(msg)

    def global_step(self) -> int:
        return self.state.global_step(self.phases["sft"].steps)

    def make_optimizer(self, spec: PhaseSpec) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                 foreach=True)

    def step_indices(self, spec: PhaseSpec, step: int) -> List[int]:
        """The global batch of optimizer step `step` of a phase: a pure function of (seed, step)."""
        return self.step_indices_range(spec, step, step + 1)

    def step_indices_range(self, spec: PhaseSpec, start: int, stop: int) -> List[int]:
        """The samples of optimizer steps [start, stop) of a phase, in order."""
        return sample_order(len(self.train), self.cfg.seed + 7919 * spec.seed_offset,
                            start * spec.batch_size, (stop - start) * spec.batch_size)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, loss: torch.Tensor) -> None:
        """Write a checkpoint of the step that produced `loss` (this process's share), unless
        the loss or a weight is non-finite (checked first: one reduction per parameter, one sync)."""
        self.check_finite(loss)
        reshard_all(self.model)
        saved = {"progress": dict(self.state.progress), "config": run_identity(self.cfg)}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.global_step(), {"train": self.state}, saved, self.d,
                                    self.cfg.keep_checkpoints)
        self.log(f"checkpoint {path}")

    def check_finite(self, loss: torch.Tensor) -> None:
        named = list(self.model.named_parameters())
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard under FSDP
        bad = [(~local(p.detach()).isfinite().all()).float() for _, p in named]
        values = all_reduce_sum(torch.stack([loss.detach().float().reshape(()), *bad]), self.d).tolist()
        weights = [name for (name, _), count in zip(named, values[1:]) if count > 0]
        if math.isfinite(values[0]) and not weights:
            return
        progress = self.state.progress
        raise FloatingPointError(
            f"non-finite values at {progress['phase']} step {progress['step']}: loss = {values[0]}"
            + (f"; weights: {', '.join(weights[:5])}" + (", ..." if len(weights) > 5 else "") if weights else "")
            + f". No checkpoint written; the newest good one stays under {self.ckpt_dir}")

    def resume(self, path) -> None:
        saved = json.loads((path / ckpt.STATE_FILE).read_text())["progress"]
        st = self.state
        st.optimizer = self.make_optimizer(self.phases[saved["phase"] if saved["phase"] != "done" else "pref"])
        if saved["phase"] != "sft":  # the reference exists from the preference phase on
            st.ref_train = torch.zeros(len(self.train), 1 + self.k)
            st.ref_eval = torch.zeros(len(self.eval_examples), 1 + self.k)
            if self.cfg.reference == "online":
                st.ref_model = frozen_copy(self.lm, self.d, self.bf16)
        st.progress = ckpt.load_checkpoint(path, {"train": st}, self.d, verify=False)["progress"]  # verified by plan_run
        self.log(f"resumed from {path} (phase {st.progress['phase']}, step {st.progress['step']})")
        self.metrics.trim(self.global_step())

    def check_reference_coverage(self, saved: Dict[str, object]) -> None:
        """A precomputed reference covers the prompts of the schedule it was computed for: a resumed
        run may add steps only while their prompts are among them (the reference model, the policy
        after SFT, is gone)."""
        progress, spec = saved["progress"], self.phases["pref"]
        if self.cfg.reference != "precompute" or progress["phase"] != "pref":
            return
        scored = set(self.step_indices_range(spec, 0, progress.get("reference_steps", spec.steps)))
        for step in range(progress["step"], spec.steps):
            missing = sorted(set(self.step_indices(spec, step)) - scored)
            if missing:
                raise ConfigError(
                    f"--steps {spec.steps}: preference step {step + 1} needs reference log-probs of training prompts "
                    f"{missing[:8]} that were not precomputed (the reference was scored for "
                    f"--steps {progress.get('reference_steps')}) and the reference model (the policy after the SFT "
                    f"warm-up) is no longer available: resume with --steps {step} at most, or start over with "
                    "--overwrite (or --reference online)")

    # ------------------------------------------------------------------ reference
    def compute_reference(self) -> None:
        """Reference log-probs of the eval set, and (precompute) of every training prompt the
        preference phase visits, from the policy as it is now: after the SFT warm-up, it is the reference."""
        cfg, st = self.cfg, self.state
        bs = max(cfg.micro_batch_size, cfg.eval_batch_size)
        if cfg.reference == "online":
            st.ref_model = frozen_copy(self.lm, self.d, self.bf16)
        spec = self.phases["pref"]
        needed = sorted(set(self.step_indices_range(spec, 0, spec.steps))) if cfg.reference == "precompute" else []
        with self.progress.phase("reference log-probs", len(needed) + len(self.eval_examples), "prompt") as ph:
            # online/none: an all-NaN table, unused; it keeps checkpoints uniform
            st.ref_train = score_table(self.model, self.train, needed, self.tasks, bs, self.pad_id, self.d,
                                       packing=self.packing, tick=ph.update)
            st.progress["reference_steps"] = spec.steps
            st.ref_eval = (sequence_logps(self.model, self.eval_examples, self.tasks, bs, self.pad_id, self.d,
                                          packing=self.packing, tick=ph.update).sums if self.eval_examples else torch.zeros(0, 1 + self.k))
            ph.summary = (f"{cfg.reference}: {len(needed)} training prompts, " if cfg.reference == "precompute"
                          else f"{cfg.reference}: training prompts scored per batch, ") + \
                f"{len(self.eval_examples)} held out"

    # ------------------------------------------------------------------ the step
    def micro_step(self, spec: PhaseSpec, mb: Sequence[int], weight: float) -> torch.Tensor:
        """Forward + backward of one micro-batch whose loss counts `weight` in the step's loss.
        Returns its weighted metrics (SFT_METRICS, or "loss" + the op's METRIC_NAMES) on device."""
        examples = [self.train[i] for i in mb]
        batch = collate_rows(examples, self.pad_id, self.packing is not None, responses=self.responses(spec))
        batch = {k: v.to(self.d.device) for k, v in batch.items()}
        if spec.name == "sft":
            loss = self.model(**batch, task=self.tasks.token_nll)["nll_sum"] * weight
            stats = loss.detach()[None]
        else:
            ref = batch_reference(self.cfg.reference, self.state.ref_train, self.state.ref_model, self.tasks,
                                  mb, batch, self.d.device)
            out = self.model(**batch, task=self.tasks.preference, ref_logps=ref)
            loss = out["loss"] * weight
            stats = torch.stack([out[n].detach().float() for n in self.metric_names(spec)]) * weight
        # FSDP averages gradients over processes; these losses are already global: undo it.
        (loss * self.d.world_size).backward()
        return stats

    def metric_names(self, spec: PhaseSpec) -> Sequence[str]:
        return SFT_METRICS if spec.name == "sft" else ("loss", *METRIC_NAMES)

    @staticmethod
    def responses(spec: PhaseSpec) -> Optional[List[int]]:
        """The responses a phase trains on: the chosen one (SFT), or all (None)."""
        return [0] if spec.name == "sft" else None

    def micro_batches(self, spec: PhaseSpec, indices: Sequence[int]) -> List[List[int]]:
        """This process's slice of the global batch `indices`, as micro-batches: `micro_batch_size`
        prompts each (padded), or whole prompts under the token budget (padding-free), as many
        micro-batches on every process (each forward all-gathers under FSDP; every process knows
        every sample's length, so no communication is needed)."""
        d = self.d
        per_rank = len(indices) // d.world_size
        shares = [list(indices[r * per_rank:(r + 1) * per_rank]) for r in range(d.world_size)]
        mine = shares[d.rank]
        if self.packing is None:
            return [mine[i:i + spec.micro_batch_size] for i in range(0, len(mine), spec.micro_batch_size)]
        sizes = [[packed_tokens(self.train[i], self.responses(spec)) for i in share] for share in shares]
        count = max(len(pack_by_tokens(s, self.packing)) for s in sizes)
        return [[mine[p] for p in b] for b in pack_by_tokens(sizes[d.rank], self.packing, min_bins=count)]

    def forward_backward(self, spec: PhaseSpec, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Accumulate the gradient of the global batch `indices` (this process takes its slice,
        in micro-batches). Returns this process's share of the step's metrics (device tensors;
        summed over processes they are the global-batch means)."""
        d = self.d
        micro = self.micro_batches(spec, indices)
        sft_tokens = sum(len(self.train[i].responses[0]) for i in indices)  # scored SFT tokens, whole step
        names = self.metric_names(spec)
        totals = torch.zeros(len(names), device=d.device)
        for m, mb in enumerate(micro):
            set_head_kept_gathered(self.model, keep=m < len(micro) - 1)
            weight = 1.0 / sft_tokens if spec.name == "sft" else len(mb) / len(indices)
            totals += self.micro_step(spec, mb, weight)
        return dict(zip(names, totals))

    def optimizer_step(self, lr: float) -> torch.Tensor:
        """Clip, step, zero. Returns the pre-clip global gradient norm (a device tensor)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        for group in self.state.optimizer.param_groups:
            group["lr"] = lr
        self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self, spec: PhaseSpec, step: int):
        lr = lr_at(step, spec.lr, spec.warmup, spec.steps, self.cfg.min_lr_ratio)
        indices = self.step_indices(spec, step)
        stats = self.forward_backward(spec, indices)
        return stats, self.optimizer_step(lr), lr, indices

    # ------------------------------------------------------------------ a phase
    def step_tokens(self, spec: PhaseSpec, indices: Sequence[int]) -> int:
        """Tokens the step processed (prompt + response per row)."""
        rows = lambda ex: ex.responses[:1] if spec.name == "sft" else ex.responses
        return sum(len(self.train[i].prompt) + len(r) for i in indices for r in rows(self.train[i]))

    def log_row(self, spec: PhaseSpec, stats, grad_norm, lr: float, tokens_per_s: float) -> Dict[str, float]:
        """Gather the step's metrics (the loop's one host sync), check them, append them to metrics.jsonl."""
        values = all_reduce_sum(torch.stack(list(stats.values())), self.d).tolist()
        row = {"phase": spec.name, "step": self.state.progress["step"], "global_step": self.global_step(),
               **dict(zip(stats.keys(), values)), "grad_norm": grad_norm.item(), "lr": lr, "tokens/s": tokens_per_s}
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} at {spec.name} step {row['step']}: "
                                     + ", ".join(f"{k} = {row[k]}" for k in bad))
        self.metrics.append(row)
        return row

    def train_phase(self, spec: PhaseSpec) -> None:
        cfg, progress = self.cfg, self.state.progress
        if self.state.optimizer is None:
            self.state.optimizer = self.make_optimizer(spec)
        self.model.train()
        window_tokens, window_t0, shown = 0, time.perf_counter(), {}
        with self.progress.phase(PHASE_TITLES[spec.name], spec.steps, "step", initial=progress["step"]) as ph:
            while progress["step"] < spec.steps:
                stats, grad_norm, lr, indices = self.train_step(spec, progress["step"])
                window_tokens += self.step_tokens(spec, indices)
                progress["step"] += 1
                if progress["step"] % cfg.log_every == 0 or progress["step"] == spec.steps:
                    row = self.log_row(spec, stats, grad_norm, lr,
                                       window_tokens / max(time.perf_counter() - window_t0, 1e-9))
                    window_tokens, window_t0 = 0, time.perf_counter()
                    shown = {k.split("/")[-1]: row[k] for k in SHOWN_METRICS if k in row}
                ph.update(1, **shown)
                if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint(stats["loss"])
            ph.summary = "last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) if shown else ""

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, when: str) -> Optional[Dict[str, float]]:
        if not self.eval_examples:
            return None
        self.model.eval()
        ref = self.state.ref_eval if self.cfg.reference != "none" else None
        result, texts = evaluate(self.model, self.eval_examples, ref, self.tok, self.tasks, self.cfg.eval_batch_size,
                                 self.cfg.max_new_tokens, self.d, self.lm.config, self.progress, when,
                                 packing=self.packing)
        self.model.train()
        self.log(f"eval {when}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        if self.d.is_main:
            write_generations(self.run_dir / f"generations_{when}.jsonl", self.eval_examples, texts)
        return result

    # ------------------------------------------------------------------ the job
    def run(self) -> Dict[str, object]:
        cfg, progress, t_start = self.cfg, self.state.progress, time.perf_counter()
        if self.d.is_main:
            self.plan.apply()
        barrier(self.d)
        if self.plan.resume_from is not None:
            self.resume(self.plan.resume_from)
            progress = self.state.progress
        else:
            self.metrics.reset()
        if self.d.is_main:
            (self.run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "distributed":
                                                                   self.distributed_info()}, indent=1))

        if progress["phase"] == "sft":
            if self.phases["sft"].steps:
                self.log(f"SFT warm-up: {self.phases['sft'].steps} steps on the chosen responses")
                self.train_phase(self.phases["sft"])
            progress.update(phase="pref", step=0)
            self.state.optimizer = None  # each phase has its own optimizer (fresh moments, own schedule)
            self.compute_reference()
            progress["eval_before"] = self.evaluate("before") if cfg.eval else None

        if progress["phase"] == "pref":
            self.log(f"preference training: {self.tasks.cfg}, lr={cfg.resolved_lr()}, {cfg.steps} steps, "
                     f"reference={cfg.reference}")
            self.train_phase(self.phases["pref"])
            progress["eval_after"] = self.evaluate("after") if cfg.eval else None
            progress.update(phase="done")

        summary = {"eval_before": progress.get("eval_before"), "eval_after": progress.get("eval_after"),
                   "wall_time_s": time.perf_counter() - t_start, "loss_type": cfg.loss_type}
        self.finish(summary)
        return summary

    def finish(self, summary: Dict[str, object]) -> None:
        if self.cfg.save_final:
            sd = full_state_dict(self.lm, self.d, rank0_only=True)
            if self.d.is_main:
                out = self.run_dir / "final"
                self.lm.save_pretrained(out, state_dict=sd)
                self.tok.save_pretrained(out)
                self.log(f"saved final model to {out}")
        if self.d.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if self.cfg.plot and self.metrics.path.exists():
                from mio_kernels.train.plot import plot_metrics
                evals = {"before": summary.get("eval_before"), "after": summary.get("eval_after")}
                png = plot_metrics(self.metrics.path, self.run_dir / "rewards.png", self.plot_title(evals), evals,
                                   self.k, self.cfg.loss_type, self.tasks.cfg.length_normalized)
                if png:
                    self.log(f"plot: {png}")
        barrier(self.d)

    def distributed_info(self) -> Dict[str, object]:
        """How the run is spread: processes, process-group backend (None for one process), FSDP2."""
        import torch.distributed as dist

        backend = str(dist.get_backend()) if dist.is_initialized() else None
        return {"processes": self.d.world_size, "backend": {"nccl": "NCCL"}.get(backend, backend),
                "fsdp2": self.d.world_size > 1, "device": self.d.device.type}

    def closing_lines(self, summary: Dict[str, object]) -> List[str]:
        """The end of a run, for a person: what was trained, the headline numbers, where the files are."""
        cfg = self.cfg
        lines = [f"done: {cfg.loss_type} (β = {cfg.resolved_beta():g}, K = {self.k}) on {cfg.model}, "
                 f"{len(self.train)} prompts of {cfg.dataset}; {self.phases['sft'].steps} SFT + {cfg.steps} "
                 f"preference steps in {duration(summary['wall_time_s'])}"
                 + (f", {self.d.world_size} processes" if self.d.world_size > 1 else "")]
        before, after = summary.get("eval_before"), summary.get("eval_after")
        if before and after:
            lines.append(f"held-out ({after['examples']} prompts): exact match {before['exact_match']:.3f} → "
                         f"{after['exact_match']:.3f}, reward accuracy {after['rewards/accuracies']:.3f}, "
                         f"margin {after['rewards/margins']:.3g}")
        last = next((r for r in reversed(self.metrics.rows()) if r.get("phase") == "pref"), None) \
            if self.metrics.path.exists() else None
        if last is not None:
            lines.append(f"last logged training step ({last['step']}): reward accuracy "
                         f"{last['rewards/accuracies']:.3f}, margin {last['rewards/margins']:.3g}, "
                         f"loss {last['loss']:.4g}")
        names = ["summary.json", "metrics.jsonl", "generations_before.jsonl", "generations_after.jsonl",
                 "rewards.png", "final", "config.json", "checkpoints"]
        files = [n + ("/" if (self.run_dir / n).is_dir() else "") for n in names if (self.run_dir / n).exists()]
        lines.append(f"files in {self.run_dir}/: " + ", ".join(files))
        return lines

    def plot_title(self, evals: Dict[str, Optional[Dict[str, float]]]) -> str:
        cfg = self.cfg
        title = (f"run '{cfg.name}': {cfg.loss_type}, β = {cfg.resolved_beta():g}, K = {self.k} rejected per prompt, "
                 f"lr {cfg.resolved_lr():g}, {cfg.steps} preference steps after {self.phases['sft'].steps} SFT steps")
        if evals["before"] and evals["after"]:
            title += (f"\nheld-out ({evals['after']['examples']} prompts) exact match "
                      f"{evals['before']['exact_match']:.3f} → {evals['after']['exact_match']:.3f}")
        return title

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
