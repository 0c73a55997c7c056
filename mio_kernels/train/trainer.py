"""The training loop: SFT warm-up -> reference log-probs -> preference training -> evaluation.

    trainer = Trainer(cfg); trainer.run()

Read top to bottom: `run` is the whole job, `train_phase` one phase's steps (log, checkpoint),
`train_step` one optimizer step = `forward_backward` (micro-batches) + `optimizer_step` (clip,
step, zero). Host syncs happen only at log time, in evaluation and in checkpoints.

Loss scaling under gradient accumulation (and across processes): the preference loss of a
micro-batch is a mean over its prompts, so it is weighted by (its prompts / prompts in the whole
step); the SFT loss is a sum of token NLLs divided by the scored tokens of the whole step (known
on every process without communication: every process knows the step's sample indices). The
weighted micro-batch losses then add up, over micro-batches and processes, to the loss of one
big batch, whatever their sizes and token counts.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mio_kernels.train import checkpoint as ckpt
from mio_kernels.train.config import TrainConfig
from mio_kernels.train.data import Example, collate, load_rows, sample_order, tokenize_rows
from mio_kernels.train.evaluate import evaluate, sequence_logps
from mio_kernels.train.model import PreferenceModel, load_model_and_tokenizer
from mio_kernels.train.parallelize import (Dist, all_reduce_sum, barrier, full_state_dict, init_distributed,
                                           parallelize, reshard_all, set_head_kept_gathered)

PREF_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "nll")
SFT_METRICS = ("loss",)
PHASES = ("sft", "pref", "done")


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


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.d = d = init_distributed(cfg.device)
        if cfg.resolved_threads() is not None and d.device.type == "cpu":
            torch.set_num_threads(cfg.resolved_threads())
        seed_everything(cfg.seed)  # same seed on every process: identical init before sharding
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(d)

        tiny = dict(hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads,
                    intermediate_size=cfg.tiny_intermediate_size, max_positions=max(256, cfg.max_length))
        lm, self.tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer, cfg.dtype, tiny)
        self.lm = lm.to(d.device)

        rows, src = load_rows(cfg.dataset, cfg.dataset_split)
        self.train, self.k = tokenize_rows(rows, src, self.tok, cfg.max_length, cfg.max_prompt_length,
                                           cfg.num_negatives, cfg.max_train_examples)
        self.eval_examples: List[Example] = []
        eval_source = cfg.resolved_eval_dataset()
        if eval_source is not None:
            erows, esrc = load_rows(eval_source, cfg.eval_split)
            self.eval_examples, _ = tokenize_rows(erows, esrc, self.tok, cfg.max_length, cfg.max_prompt_length,
                                                  self.k, cfg.max_eval_examples)
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        for name, examples in (("training", self.train), ("evaluation", self.eval_examples)):
            top = max((max(ex.prompt + [t for r in ex.responses for t in r]) for ex in examples), default=0)
            if top >= vocab:
                raise ValueError(f"{name} data has token id {top} but the model's LM head has {vocab} rows: "
                                 "tokenizer and model do not match")
        truncated = sum(ex.truncated for ex in self.train)
        self.log(f"data: {len(self.train)} training prompts from {src} (K={self.k} rejected each, "
                 f"{truncated} truncated to max_length={cfg.max_length}), {len(self.eval_examples)} held out")

        bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
        self.bf16 = bf16
        self.model = parallelize(PreferenceModel(self.lm), d, bf16, cfg.activation_checkpointing)
        self.loss_kwargs = dict(loss_type=cfg.loss_type, beta=cfg.resolved_beta(), num_negatives=self.k,
                                label_smoothing=cfg.label_smoothing, average_log_prob=cfg.average_log_prob,
                                reference_free=cfg.reference == "none", sft_weight=cfg.sft_weight,
                                ignore_index=-100, backend=cfg.backend)
        self.pad_id = self.tok.pad_token_id
        self.phases = {
            "sft": PhaseSpec("sft", cfg.resolved_sft_steps(), cfg.sft_batch_size, cfg.sft_micro_batch_size,
                             cfg.sft_lr, cfg.sft_warmup_steps, 0),
            "pref": PhaseSpec("pref", cfg.steps, cfg.batch_size, cfg.micro_batch_size, cfg.resolved_lr(),
                              cfg.warmup_steps, 1),
        }
        for spec in self.phases.values():
            if spec.steps and spec.batch_size % d.world_size:
                raise ValueError(f"{spec.name} batch size {spec.batch_size} must be a multiple of the "
                                 f"{d.world_size} processes")
        # Progress: what a checkpoint must restore besides tensors.
        self.state = {"phase": "sft", "step": 0, "eval_before": None, "eval_after": None}
        self.ref_train: Optional[torch.Tensor] = None  # [N, 1+K] reference log-probs
        self.ref_eval: Optional[torch.Tensor] = None
        self.ref_model: Optional[PreferenceModel] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.d.is_main:
            print(f"[mio-train] {msg}", flush=True)

    def global_step(self) -> int:
        done_sft = self.phases["sft"].steps if self.state["phase"] != "sft" else 0
        return done_sft + self.state["step"]

    def make_optimizer(self, spec: PhaseSpec) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                 foreach=True)

    # ------------------------------------------------------------------ checkpoints
    def app_state(self) -> Dict[str, object]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state: Dict[str, object] = {"model": model_sd, "optim": optim_sd}
        if self.ref_train is not None:
            state["ref"] = {"train": self.ref_train, "eval": self.ref_eval}
        if self.ref_model is not None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            state["ref_model"] = get_model_state_dict(self.ref_model)
        return state

    def save_checkpoint(self) -> None:
        reshard_all(self.model)
        path = ckpt.save_checkpoint(self.ckpt_dir, self.global_step(), self.app_state(), dict(self.state),
                                    self.d, self.cfg.keep_checkpoints)
        self.log(f"checkpoint {path}")

    def try_resume(self) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            self.log(f"resume: no complete checkpoint under {self.ckpt_dir}, starting fresh")
            return
        saved = json.loads((path / ckpt.STATE_FILE).read_text())
        self.state = saved
        phase = saved["phase"] if saved["phase"] != "done" else "pref"
        self.optimizer = self.make_optimizer(self.phases[phase])
        if saved["phase"] != "sft":  # the reference exists from the preference phase on
            n, w = len(self.train), 1 + self.k
            self.ref_train = torch.zeros(n, w)
            self.ref_eval = torch.zeros(len(self.eval_examples), w)
            if self.cfg.reference == "online":
                self.ref_model = self.build_reference_model()
        state = self.app_state()
        self.state = ckpt.load_checkpoint(path, state, self.d)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.ref_model is not None:
            set_model_state_dict(self.ref_model, state["ref_model"])
        self.log(f"resumed from {path} (phase {self.state['phase']}, step {self.state['step']})")
        self.trim_metrics()

    def trim_metrics(self) -> None:
        """Drop metric lines a killed run wrote after the checkpoint it resumes from."""
        if not self.d.is_main or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["global_step"] <= self.global_step()]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ reference
    def build_reference_model(self) -> PreferenceModel:
        """A frozen copy of the policy as it is now (online reference), sharded like the policy."""
        sd = full_state_dict(self.lm, self.d)
        ref_lm = type(self.lm)(self.lm.config).to(self.d.device)
        ref_lm.load_state_dict(sd)
        ref_lm.requires_grad_(False).eval()
        return parallelize(PreferenceModel(ref_lm), self.d, self.bf16, activation_checkpointing=False)

    def compute_reference(self) -> None:
        """Reference log-probs of the eval set, and (precompute) of the whole training set, in one
        forward-only pass of the policy as it is now: after the SFT warm-up, it is the reference."""
        bs = max(self.cfg.micro_batch_size, self.cfg.eval_batch_size)
        if self.cfg.reference == "online":
            self.ref_model = self.build_reference_model()
        t0 = time.perf_counter()
        if self.cfg.reference == "precompute":
            # Every training prompt the preference phase will visit (all of them once it runs an
            # epoch); the others stay NaN, so using one by mistake shows as a NaN loss.
            spec = self.phases["pref"]
            needed = sorted(set(self.step_indices_range(spec, 0, spec.steps)))
            self.ref_train = torch.full((len(self.train), 1 + self.k), float("nan"))
            if needed:
                self.ref_train[needed] = sequence_logps(self.model, [self.train[i] for i in needed],
                                                        self.loss_kwargs, bs, self.pad_id, self.d)
        else:
            self.ref_train = torch.zeros(len(self.train), 1 + self.k)  # unused; keeps checkpoints uniform
        self.ref_eval = (sequence_logps(self.model, self.eval_examples, self.loss_kwargs, bs, self.pad_id, self.d)
                         if self.eval_examples else torch.zeros(0, 1 + self.k))
        scored = (f"{int(self.ref_train[:, 0].isfinite().sum())} training prompts"
                  if self.cfg.reference == "precompute" else "training prompts scored per batch")
        self.log(f"reference log-probs ({self.cfg.reference}: {scored}, {len(self.eval_examples)} held out) "
                 f"in {time.perf_counter() - t0:.1f}s")

    def batch_ref_logps(self, indices: Sequence[int], batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """[S] reference log-probs in the loss's row layout (chosen block, then K rejected blocks)."""
        if self.cfg.reference == "none":
            return None
        if self.cfg.reference == "online":
            with torch.no_grad():
                return self.ref_model(**batch, mode="logps", loss_kwargs=self.loss_kwargs)["policy_logps"]
        return self.ref_train[list(indices)].T.reshape(-1).to(self.d.device)

    # ------------------------------------------------------------------ the step
    def forward_backward(self, spec: PhaseSpec, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Accumulate the gradient of the global batch `indices` (this process takes its slice,
        in micro-batches). Returns this process's share of the step's metrics (device tensors;
        summed over processes they are the global-batch means)."""
        d, model = self.d, self.model
        per_rank = len(indices) // d.world_size
        mine = list(indices[d.rank * per_rank:(d.rank + 1) * per_rank])
        micro = [mine[i:i + spec.micro_batch_size] for i in range(0, len(mine), spec.micro_batch_size)]
        global_prompts = len(indices)
        global_tokens = sum(len(self.train[i].responses[0]) for i in indices)  # scored SFT tokens
        names = SFT_METRICS if spec.name == "sft" else PREF_METRICS
        totals = torch.zeros(len(names), device=d.device)
        for m, mb in enumerate(micro):
            examples = [self.train[i] for i in mb]
            set_head_kept_gathered(model, keep=m < len(micro) - 1)
            if spec.name == "sft":
                batch = {k: v.to(d.device) for k, v in collate(examples, self.pad_id, responses=[0]).items()}
                out = model(**batch, mode="sft", loss_kwargs=self.loss_kwargs)
                loss = out["nll_sum"] / global_tokens
                stats = loss.detach()[None]
            else:
                batch = {k: v.to(d.device) for k, v in collate(examples, self.pad_id).items()}
                ref = self.batch_ref_logps(mb, batch)
                out = model(**batch, mode="pref", loss_kwargs=self.loss_kwargs, ref_logps=ref)
                weight = len(mb) / global_prompts
                loss = out["loss"] * weight
                stats = torch.stack([out[n].detach().float() for n in names]) * weight
            # FSDP averages gradients over processes; these losses are already global: undo it.
            (loss * d.world_size).backward()
            totals += stats
        return dict(zip(names, totals))

    def optimizer_step(self, lr: float) -> torch.Tensor:
        """Clip, step, zero. Returns the pre-clip global gradient norm (a device tensor)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step_indices(self, spec: PhaseSpec, step: int) -> List[int]:
        """The global batch of optimizer step `step` of a phase: a pure function of (seed, step)."""
        return sample_order(len(self.train), self.cfg.seed + 7919 * spec.seed_offset,
                            step * spec.batch_size, spec.batch_size)

    def step_indices_range(self, spec: PhaseSpec, start: int, stop: int) -> List[int]:
        """The samples of optimizer steps [start, stop) of a phase, in order."""
        return sample_order(len(self.train), self.cfg.seed + 7919 * spec.seed_offset,
                            start * spec.batch_size, (stop - start) * spec.batch_size)

    def train_step(self, spec: PhaseSpec, step: int):
        lr = lr_at(step, spec.lr, spec.warmup, spec.steps, self.cfg.min_lr_ratio)
        indices = self.step_indices(spec, step)
        stats = self.forward_backward(spec, indices)
        return stats, self.optimizer_step(lr), lr, indices

    # ------------------------------------------------------------------ a phase
    def train_phase(self, spec: PhaseSpec) -> None:
        cfg, d = self.cfg, self.d
        if self.optimizer is None:
            self.optimizer = self.make_optimizer(spec)
        self.model.train()
        bar = None
        if cfg.progress and d.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=spec.steps, initial=self.state["step"], desc=spec.name, dynamic_ncols=True)
        window_tokens, window_t0 = 0, time.perf_counter()
        while self.state["step"] < spec.steps:
            step = self.state["step"]
            stats, grad_norm, lr, indices = self.train_step(spec, step)
            window_tokens += sum(len(self.train[i].prompt) + len(r) for i in indices
                                 for r in (self.train[i].responses[:1] if spec.name == "sft"
                                           else self.train[i].responses))
            self.state["step"] = step + 1
            last = self.state["step"] == spec.steps
            if self.state["step"] % cfg.log_every == 0 or last:
                values = all_reduce_sum(torch.stack(list(stats.values())), d).tolist()  # the host sync
                elapsed = time.perf_counter() - window_t0
                row = {"phase": spec.name, "step": self.state["step"], "global_step": self.global_step(),
                       **dict(zip(stats.keys(), values)), "grad_norm": grad_norm.item(), "lr": lr,
                       "tokens/s": window_tokens / max(elapsed, 1e-9)}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"non-finite loss at {spec.name} step {row['step']}: {row}")
                window_tokens, window_t0 = 0, time.perf_counter()
                if d.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if bar is not None:
                        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "rewards/margins", "rewards/accuracies")
                                         if k in row})
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and self.state["step"] % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, when: str) -> Optional[Dict[str, float]]:
        if not self.eval_examples:
            return None
        self.model.eval()
        t0 = time.perf_counter()
        ref = self.ref_eval if self.cfg.reference != "none" else None
        result, texts = evaluate(self.model, self.eval_examples, ref, self.tok, self.loss_kwargs,
                                 self.cfg.eval_batch_size, self.cfg.max_new_tokens, self.d, self.lm.config)
        self.model.train()
        self.log(f"eval {when} ({time.perf_counter() - t0:.1f}s): " + ", ".join(
            f"{k}={v:.4g}" for k, v in result.items()))
        if self.d.is_main:
            with open(self.run_dir / f"generations_{when}.jsonl", "w") as f:
                for ex, text in zip(self.eval_examples, texts):
                    f.write(json.dumps({"answer": ex.answer, "generation": text}) + "\n")
        return result

    # ------------------------------------------------------------------ the job
    def run(self) -> Dict[str, object]:
        cfg, t_start = self.cfg, time.perf_counter()
        if cfg.resume:
            self.try_resume()
        elif self.d.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        if self.d.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

        if self.state["phase"] == "sft":
            if self.phases["sft"].steps:
                self.log(f"SFT warm-up: {self.phases['sft'].steps} steps on the chosen responses")
                self.train_phase(self.phases["sft"])
            self.state.update(phase="pref", step=0)
            self.optimizer = None  # each phase has its own optimizer (fresh moments, own schedule)
            self.compute_reference()
            self.state["eval_before"] = self.evaluate("before") if cfg.eval else None

        if self.state["phase"] == "pref":
            self.log(f"preference training: loss_type={cfg.loss_type}, beta={cfg.resolved_beta()}, lr={cfg.resolved_lr()}, {cfg.steps} steps, "
                     f"reference={cfg.reference}")
            self.train_phase(self.phases["pref"])
            self.state["eval_after"] = self.evaluate("after") if cfg.eval else None
            self.state.update(phase="done")

        summary = {"eval_before": self.state.get("eval_before"), "eval_after": self.state.get("eval_after"),
                   "wall_time_s": time.perf_counter() - t_start, "loss_type": cfg.loss_type}
        self.finish(summary)
        return summary

    def finish(self, summary: Dict[str, object]) -> None:
        cfg = self.cfg
        if cfg.save_final:
            sd = full_state_dict(self.lm, self.d, rank0_only=True)
            if self.d.is_main:
                out = self.run_dir / "final"
                self.lm.save_pretrained(out, state_dict=sd)
                self.tok.save_pretrained(out)
                self.log(f"saved final model to {out}")
        if self.d.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if cfg.plot and self.metrics_path.exists():
                from mio_kernels.train.plot import plot_metrics
                png = plot_metrics(self.metrics_path, self.run_dir / "rewards.png")
                if png:
                    self.log(f"plot: {png}")
        barrier(self.d)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
