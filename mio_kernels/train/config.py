"""TrainConfig: every option of the trainer, one docstring per field (also the CLI help).

Precedence: dataclass defaults < config file (--config x.yaml | x.json, keys = field names)
< command-line flags (--field-name value; booleans as --flag / --no-flag).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mio_kernels.backends import BACKEND_NAMES
from mio_kernels.losses import DEFAULT_LOSS, LOSSES, TRL_LOSS_ALIASES  # aliases: accepted by --loss-type
from mio_kernels.objective import PreferenceConfig
from mio_kernels.train.data import BUILTIN_DATASET
from mio_kernels.train.model import BUILTIN_MODEL
from mio_kernels.validation import check_config


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- run
    name: str = "default"
    """Run name: outputs (metrics.jsonl, plot, checkpoints, final model) go to <output_dir>/<name>/."""
    output_dir: str = "runs"
    """Parent directory of the run directory (relative to the current directory)."""
    seed: int = 0
    """Seeds model init, data order and every RNG; with it a CPU run is bit-for-bit repeatable."""
    device: str = "auto"
    """auto (CUDA when available, else CPU) | cpu | cuda."""
    threads: Optional[int] = None
    """CPU threads per process (torch.set_num_threads). Default: 1 for builtin:tiny-llama (its ops
    are too small to gain from more, and OpenMP threads stall badly on shared cores), else torch's."""

    # ---------------------------------------------------------------- model
    model: str = BUILTIN_MODEL
    """A HF causal LM: local directory or hub id (hub needs network), or builtin:tiny-llama
    (a Llama-architecture model built from a config, random init, no download)."""
    tokenizer: Optional[str] = None
    """Tokenizer path/id; default: the model's (the builtin model builds its own locally)."""
    dtype: str = "float32"
    """Parameter (master weight) dtype: float32 | bfloat16."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, off on CPU) | bf16 | none. Autocast for the backbone; under FSDP the
    parameters are gathered in bf16 with fp32 gradient reduction."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward instead of storing its activations."""
    tiny_hidden_size: int = 128
    """builtin:tiny-llama hidden size."""
    tiny_layers: int = 4
    """builtin:tiny-llama decoder blocks."""
    tiny_heads: int = 4
    """builtin:tiny-llama attention heads."""
    tiny_intermediate_size: int = 384
    """builtin:tiny-llama MLP width."""

    # ---------------------------------------------------------------- data
    dataset: str = BUILTIN_DATASET
    """Preference data in TRL's format (prompt, chosen, rejected: str or list of K str): a local
    .json/.jsonl/.parquet file, a `datasets` name, or builtin:arithmetic (shipped)."""
    dataset_split: str = "train"
    """Split of `dataset` to train on."""
    eval_dataset: Optional[str] = None
    """Held-out preference data for evaluation; default: builtin:arithmetic's test split when
    training on builtin:arithmetic, else no evaluation."""
    eval_split: str = "test"
    """Split of `eval_dataset`."""
    max_train_examples: Optional[int] = None
    """Use only the first N training rows (default: all)."""
    max_eval_examples: int = 300
    """Evaluate on the first N held-out rows."""
    max_length: int = 128
    """Tokens per sequence (prompt + response, EOS included); a longer row keeps its prompt's last
    --max-prompt-length tokens, then its responses are cut to fit."""
    max_prompt_length: int = 96
    """Prompt tokens kept (its last ones) when a row must be truncated."""

    # ---------------------------------------------------------------- preference loss
    loss_type: str = DEFAULT_LOSS
    """The preference loss: one of the registered losses (listed below; one added with
    mio_kernels.losses.register_loss before the trainer starts is accepted too)."""
    beta: Optional[float] = None
    """Reward scale: r = beta * (log pi(y|x) - log pi_ref(y|x)). Default: 0.1 (TRL's), but 0.5
    for builtin:tiny-llama (on the embedded job 0.1 let both losses drift the chosen likelihood down)."""
    num_negatives: Optional[int] = None
    """K rejected responses per prompt; default: as many as the rows have (all rows must agree)."""
    label_smoothing: float = 0.0
    """Label smoothing for loss_type=robust."""
    average_log_prob: bool = False
    """Length-normalise sequence log-probs (mean over response tokens instead of sum)."""
    sft_weight: float = 0.0
    """Add sft_weight * NLL of the chosen responses to the preference loss (RPO)."""
    reference: str = "precompute"
    """precompute: reference log-probs of the whole training set in one forward-only pass before
    preference training (no second model in memory) | online: a frozen copy of the policy scores
    each batch | none: reference-free."""
    backend: str = "auto"
    """fused_mio_loss backend: auto | triton | native | reference."""

    # ---------------------------------------------------------------- preference optimisation
    steps: int = 120
    """Preference-training optimizer steps."""
    batch_size: int = 16
    """Prompts per optimizer step, over all processes (each brings its 1 + K responses)."""
    micro_batch_size: int = 8
    """Prompts per forward/backward on one process; gradients accumulate over
    batch_size / (micro_batch_size * processes) micro-batches (the last may be smaller)."""
    padding_free: bool = True
    """Padding-free batches: each micro-batch is ONE packed row of its sequences (position_ids
    restarting at every sequence, from which transformers builds a block-diagonal causal mask;
    flash-attention's varlen path on GPU), so no layer computes on padding. Micro-batches are
    filled to --max-tokens-per-micro-batch, whole prompts at a time (--micro-batch-size and
    --sft-micro-batch-size are then unused); the SFT warm-up, the reference pass and evaluation
    log-probs pack the same way. --no-padding-free: right-padded [rows, longest] batches. Same
    loss and gradients either way, to fp32 rounding. A model whose layers cannot keep packed
    sequences apart is refused at start."""
    max_tokens_per_micro_batch: int = 1024
    """Token budget of one packed micro-batch (--padding-free): prompt + response tokens of every
    response of the prompts in it. A prompt with all its responses is never split (one over the
    budget gets a micro-batch of its own). On CPU (and with sdpa/eager attention) the packed row's
    attention mask is a dense [N, N], so attention costs grow with the budget: ~1k suits small models
    on CPU; on GPU (flash-attention varlen: only each sequence's own pairs) larger budgets pay off."""
    lr: Optional[float] = None
    """Peak learning rate of the preference phase. Default: 1e-4 for builtin:tiny-llama, else 1e-6
    (TRL's DPO default, for pretrained models)."""
    warmup_steps: int = 10
    """Linear warm-up steps, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is logged either way)."""

    # ---------------------------------------------------------------- SFT warm-up
    sft_steps: Optional[int] = None
    """SFT warm-up steps on the chosen responses before preference training (the result is the
    reference model); default: 300 for builtin:tiny-llama (it starts from random weights), else 0."""
    sft_batch_size: int = 32
    """Prompts per SFT optimizer step, over all processes."""
    sft_micro_batch_size: int = 32
    """Prompts per SFT forward/backward on one process."""
    sft_lr: float = 2e-3
    """Peak learning rate of the SFT warm-up (same schedule shape as the preference phase); the
    value suits builtin:tiny-llama from random weights: set it when warming up a pretrained model."""
    sft_warmup_steps: int = 20
    """Linear warm-up steps of the SFT phase."""

    # ---------------------------------------------------------------- evaluation
    eval: bool = True
    """Evaluate before and after preference training (needs an eval dataset)."""
    max_new_tokens: int = 40
    """Greedy decoding length limit for exact-match evaluation."""
    eval_batch_size: int = 100
    """Prompts per evaluation forward."""

    # ---------------------------------------------------------------- output and checkpoints
    log_every: int = 1
    """Write metrics every N optimizer steps (the only host syncs of the loop)."""
    progress: bool = True
    """Show each phase's progress (rank 0): a bar with ETA on a terminal, a plain line every 30 s
    otherwise. --no-progress shows neither, nor the bars of transformers/datasets; the one-line
    summary of each phase is printed either way."""
    plot: bool = True
    """Write rewards.png (chosen/rejected rewards and log-probs over steps) at the end."""
    save_final: bool = True
    """save_pretrained the final model and tokenizer to <run>/final."""
    checkpoint_every: int = 0
    """Write a torch.distributed.checkpoint every N optimizer steps (0: never). Atomic."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are deleted after a new one completes)."""
    resume: bool = False
    """Continue this run from its newest verified checkpoint (a run that stopped before its first
    checkpoint starts over). The options that change the model, the data, the loss or the
    reference must match the checkpoint's."""
    overwrite: bool = False
    """Delete this run's directory (checkpoints, metrics, final model) and start over. Without it
    (or --resume) a run directory that already holds a run is refused."""

    # ------------------------------------------------------------------------
    def __post_init__(self):
        if self.loss_type in TRL_LOSS_ALIASES and self.loss_type not in LOSSES:
            self.loss_type = TRL_LOSS_ALIASES[self.loss_type]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def resolved_threads(self) -> Optional[int]:
        if self.threads is not None:
            return self.threads
        return 1 if self.model == BUILTIN_MODEL else None

    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 0.5 if self.model == BUILTIN_MODEL else 0.1

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.model == BUILTIN_MODEL else 1e-6

    def resolved_sft_steps(self) -> int:
        if self.sft_steps is not None:
            return self.sft_steps
        return 300 if self.model == BUILTIN_MODEL else 0

    def resolved_eval_dataset(self) -> Optional[str]:
        if self.eval_dataset is not None or not self.eval:
            return self.eval_dataset if self.eval else None
        return BUILTIN_DATASET if self.dataset == BUILTIN_DATASET else None

    def preference_config(self, num_negatives: int) -> PreferenceConfig:
        """The loss options, in the op's own form (K comes from the data when num_negatives is None)."""
        return PreferenceConfig(loss_type=self.loss_type, beta=self.resolved_beta(), num_negatives=num_negatives,
                                label_smoothing=self.label_smoothing, average_log_prob=self.average_log_prob,
                                reference_free=self.reference == "none", sft_weight=self.sft_weight)

    def validate(self) -> "TrainConfig":
        """Check every option before any work; a ConfigError names the option (as its flag)."""
        validate_config(self)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The fields, plus the values the None ("automatic") ones resolved to."""
        return {**dataclasses.asdict(self), "resolved": {
            "beta": self.resolved_beta(), "lr": self.resolved_lr(), "sft_steps": self.resolved_sft_steps(),
            "threads": self.resolved_threads(), "eval_dataset": self.resolved_eval_dataset()}}


# ----------------------------------------------------------------------------- validation

# May differ between a run and its resumption (the others must match the checkpoint's).
# padding_free and max_tokens_per_micro_batch, like micro_batch_size, only regroup a step's prompts
# into forwards: the prompts of every step, the loss and the gradients stay the same (to fp32 rounding).
MAY_CHANGE_ON_RESUME = ("name", "output_dir", "device", "threads", "backend", "activation_checkpointing", "steps",
                        "micro_batch_size", "sft_micro_batch_size", "padding_free", "max_tokens_per_micro_batch",
                        "max_new_tokens", "eval_batch_size", "log_every",
                        "progress", "plot", "save_final", "checkpoint_every", "keep_checkpoints", "resume",
                        "overwrite")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")


class ConfigError(ValueError):
    """An invalid option; the message names it as its command-line flag."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _looks_like_path(value: str, data: bool) -> bool:
    """A local path rather than a hub id (org/name) or a builtin: name."""
    if value.startswith("builtin:"):
        return False
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value
            or (data and Path(value).suffix.lower() in DATA_SUFFIXES))


def _check_paths(cfg: TrainConfig) -> None:
    """A path-looking --model/--tokenizer/--dataset/--eval-dataset that does not exist fails here,
    without a network lookup."""
    for name, data in (("model", False), ("tokenizer", False), ("dataset", True), ("eval_dataset", True)):
        value = getattr(cfg, name)
        if value is None or not _looks_like_path(value, data) or Path(value).expanduser().exists():
            continue
        what = "file" if data and Path(value).suffix else "directory"
        raise ConfigError(f"{flag(name)} {value}: no such {what} (a local path; hub ids look like org/name)")


def _check_loss(cfg: TrainConfig) -> None:
    """The op's own validation of its options, with its field names turned into flags."""
    try:
        check_config(cfg.preference_config(1 if cfg.num_negatives is None else cfg.num_negatives))
    except ValueError as err:
        msg = str(err)
        if msg.startswith("loss_type"):
            msg += " (TRL's names are accepted too: " + ", ".join(f"{a} = {b}" for a, b in TRL_LOSS_ALIASES.items()) + ")"
        field_name = re.match(r"\w+", msg)
        if field_name and field_name.group(0) in {f.name for f in fields(TrainConfig)}:
            msg = flag(field_name.group(0)) + msg[field_name.end():]
        raise ConfigError(msg) from None


def _number(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value).is_integer() if integer else math.isfinite(value)


def validate_config(cfg: TrainConfig) -> None:
    def need(ok: bool, name: str, expected: str, value=None):
        if not ok:
            raise ConfigError(f"{flag(name)} must be {expected}, got {getattr(cfg, name) if value is None else value!r}")

    def at_least(names, low: float, integer: bool = True, optional: bool = False):
        for name in names:
            value = getattr(cfg, name)
            if not (optional and value is None):
                need(_number(value, integer) and value >= low, name, f"{'an integer' if integer else 'a number'} >= {low}")

    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (continue the run, or delete it and start over)")
    need(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name", "a plain directory name")
    choices = {"reference": ("precompute", "online", "none"), "device": ("auto", "cpu", "cuda"),
               "mixed_precision": ("auto", "bf16", "none"), "dtype": ("float32", "bfloat16"), "backend": BACKEND_NAMES}
    for name, allowed in choices.items():
        need(getattr(cfg, name) in allowed, name, "one of " + "|".join(allowed))
    at_least(("num_negatives", "max_train_examples", "threads"), 1, optional=True)
    _check_loss(cfg)
    at_least(("batch_size", "micro_batch_size", "sft_batch_size", "sft_micro_batch_size", "log_every",
              "eval_batch_size", "max_new_tokens", "max_eval_examples", "keep_checkpoints", "max_length",
              "max_tokens_per_micro_batch",
              "max_prompt_length", "tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_intermediate_size"), 1)
    at_least(("steps", "sft_steps", "warmup_steps", "sft_warmup_steps", "checkpoint_every"), 0, optional=True)
    at_least(("grad_clip", "weight_decay"), 0, integer=False)
    for name, value in (("lr", cfg.resolved_lr()), ("sft_lr", cfg.sft_lr)):
        need(_number(value, False) and value > 0, name, "a finite number > 0", value)
    need(_number(cfg.min_lr_ratio, False) and 0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
    for name in ("adam_beta1", "adam_beta2"):
        need(_number(getattr(cfg, name), False) and 0 <= getattr(cfg, name) < 1, name, "in [0, 1)")
    need(cfg.max_prompt_length < cfg.max_length, "max_prompt_length", f"< --max-length ({cfg.max_length})")
    if cfg.eval and "eval" in getattr(cfg, "given", ()) and cfg.resolved_eval_dataset() is None:
        raise ConfigError("--eval needs held-out data: pass --eval-dataset (only builtin:arithmetic brings its own "
                          "test split)")
    if cfg.model == BUILTIN_MODEL:
        need(cfg.tiny_hidden_size % cfg.tiny_heads == 0, "tiny_hidden_size", f"a multiple of --tiny-heads ({cfg.tiny_heads})")
    _check_paths(cfg)


def explicit_options(cfg: TrainConfig) -> set:
    """The options the user set: those given on the command line or in the config file (parse_args
    records them), else (a TrainConfig built in code) those that differ from their defaults."""
    given = getattr(cfg, "given", None)
    if given is not None:
        return set(given)
    return {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}


def _unused(names, explicit, why: str) -> List[str]:
    used = [flag(n) for n in names if n in explicit]
    return [f"{', '.join(used)} {'has' if len(used) == 1 else 'have'} no effect: {why}"] if used else []


def option_warnings(cfg: TrainConfig) -> List[str]:
    """One line per option that was set but cannot act in this run (the run goes on without it).
    (An explicit --eval without held-out data is an error instead: validate_config.)"""
    explicit, out = explicit_options(cfg), []
    sft_steps = cfg.resolved_sft_steps()
    for phase, warmup, steps in (("preference", "warmup_steps", cfg.steps), ("SFT", "sft_warmup_steps", sft_steps)):
        w = getattr(cfg, warmup)
        if 0 < steps < w:
            out.append(f"{flag(warmup)} {w} > the {steps} {phase} steps: the learning rate never reaches its peak "
                       f"(the last step runs at {steps / w:.0%} of it) and never decays")
    if cfg.padding_free:
        out += _unused(("micro_batch_size", "sft_micro_batch_size"), explicit,
                       "padding-free micro-batches are filled to --max-tokens-per-micro-batch (--no-padding-free "
                       "uses it)")
    else:
        out += _unused(("max_tokens_per_micro_batch",), explicit, "it sizes padding-free micro-batches only")
    if cfg.model != BUILTIN_MODEL:
        out += _unused(("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_intermediate_size"), explicit,
                       f"they shape {BUILTIN_MODEL} only, not --model {cfg.model}")
    if cfg.resolved_eval_dataset() is None:
        why = "evaluation is off (--no-eval)" if not cfg.eval else "there is no held-out data (--eval-dataset)"
        out += _unused(("eval_dataset", "eval_split", "max_eval_examples", "eval_batch_size", "max_new_tokens"),
                       explicit - ({"eval_dataset"} if cfg.eval else set()), why)
    if sft_steps == 0:
        out += _unused(("sft_batch_size", "sft_micro_batch_size", "sft_lr", "sft_warmup_steps"), explicit,
                       "there is no SFT warm-up (--sft-steps 0)")
    if cfg.checkpoint_every == 0:
        out += _unused(("keep_checkpoints",), explicit, "no checkpoints are written (--checkpoint-every 0)")
    elif cfg.checkpoint_every > sft_steps + cfg.steps:
        out.append(f"--checkpoint-every {cfg.checkpoint_every} > the run's {sft_steps + cfg.steps} steps: "
                   "no checkpoint will be written")
    for name, split in (("dataset", "dataset_split"), ("eval_dataset", "eval_split")):
        value = getattr(cfg, name)
        if value is not None and Path(value).is_file() and split in explicit:
            out += _unused((split,), explicit, f"{flag(name)} is a file (one split)")
    return out


# ----------------------------------------------------------------------------- CLI

def field_docs(cls=TrainConfig) -> Dict[str, str]:
    """Field name -> its docstring (the string literal after it in the class body)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _parse_value(name: str, tp, raw: str):
    base = _base_type(tp)
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    try:
        return base(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: expected {base.__name__}, got {raw!r}")


def _choices(name: str) -> str:
    if name == "loss_type":
        return (f" One of: {', '.join(LOSSES)}; TRL's names are accepted too: "
                + ", ".join(f"{a} (= {b})" for a, b in TRL_LOSS_ALIASES.items()) + ".")
    if name == "resume":
        return " Options that may change on resume: " + ", ".join(flag(n) for n in MAY_CHANGE_ON_RESUME) + "."
    return ""


# --help shows the options in these groups, in this order (every field in exactly one)
HELP_GROUPS = {
    "model and data": ("model", "tokenizer", "dtype", "mixed_precision", "tiny_hidden_size", "tiny_layers",
                       "tiny_heads", "tiny_intermediate_size", "dataset", "dataset_split", "eval_dataset", "eval_split",
                       "max_train_examples", "max_eval_examples", "max_length", "max_prompt_length"),
    "loss": ("loss_type", "beta", "num_negatives", "label_smoothing", "average_log_prob", "sft_weight", "reference",
             "backend"),
    "optimisation": ("steps", "batch_size", "micro_batch_size", "padding_free", "max_tokens_per_micro_batch", "lr",
                     "warmup_steps", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip",
                     "activation_checkpointing", "sft_steps", "sft_batch_size", "sft_micro_batch_size", "sft_lr",
                     "sft_warmup_steps"),
    "run and checkpoints": ("name", "output_dir", "seed", "device", "threads", "checkpoint_every", "keep_checkpoints",
                            "resume", "overwrite"),
    "evaluation and output": ("eval", "max_new_tokens", "eval_batch_size", "log_every", "progress", "plot",
                              "save_final"),
}


def build_parser() -> argparse.ArgumentParser:
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    parser = argparse.ArgumentParser(
        prog="mio-train",
        description="Preference-train a causal LM with fused_mio_loss (the logits are never formed). "
                    "With no arguments: the embedded default job (tiny Llama, shipped arithmetic "
                    "preferences, SFT warm-up, then MIO, evaluation before/after). "
                    "Multi-process: torchrun --nproc_per_node N -m mio_kernels.train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}
    group_of = {name: groups[title] for title, names in HELP_GROUPS.items() for name in names}
    run = groups["run and checkpoints"]
    run.add_argument("--config", help="YAML or JSON file of option: value (keys: the option names with _ for -; "
                                      "flags override it)")
    run.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: off)")
    for f in fields(TrainConfig):
        option = flag(f.name)
        tp = hints[f.name]
        group = group_of.get(f.name, parser)
        if _base_type(tp) is bool:
            group.add_argument(option, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=docs.get(f.name, "") + _choices(f.name)
                               + f" (default: {'on' if f.default else 'off'})")
        else:
            group.add_argument(option, dest=f.name, default=argparse.SUPPRESS, metavar=_base_type(tp).__name__.upper(),
                                type=lambda raw, n=f.name, t=tp: _parse_value(n, t, raw),
                                help=docs.get(f.name, "") + _choices(f.name) + f" (default: {f.default})")
    return parser


def load_config_file(path: str) -> Dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown option {key!r}")
        out[name] = value
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)
    values = load_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    cfg = TrainConfig(**values)
    cfg.given = frozenset(values)  # not a field: which options the user set (option_warnings)
    return cfg.validate()
