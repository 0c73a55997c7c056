"""TRL integration: `MIOTrainer` (a `trl.DPOTrainer`) and `MIOConfig` (a `trl.DPOConfig`); for GRPO,
`MIOGRPOTrainer` (a `trl.GRPOTrainer`) and `MIOGRPOConfig` (a `trl.GRPOConfig`): see MIOGRPOTrainer.

The loss comes from `fused_mio_loss` on the backbone's last hidden states and the LM head weight:
the logits are never whole, the backward is the op's single pass, and `mio`/`dpo` take K >= 1
rejected responses per prompt (a dataset whose `rejected` is a list of K responses).

TRL loss names map to the op's where they are the same loss:
    sigmoid -> dpo, nca_pair -> mio (K = 1), ipo, hinge, robust, bco_pair, sppo_hard, apo_zero,
    and the op's own mio / dpo (any K).
Reference log-probs are sequence sums, as in TRL (precompute_ref_log_probs, a reference model, or
PEFT's reference-by-disabled-adapter). Logged: TRL's rewards/*, logps/*, logits/* and num_tokens;
rewards and logps in TRL's units (sums) for every loss. For K > 1, rewards/margins is chosen minus
the mean of the K rejected, rewards/accuracies counts chosen above every rejected.
Refused at construction (never a silent difference): TRL's other loss types, loss mixes and
loss_weights, ld_alpha, use_weighting (WPO), f_divergence_type other than reverse_kl,
label_smoothing outside robust, vision data, MoE router aux losses, and heads the op cannot
express. Heads with softcapping (Gemma-2/3) or a logit scale (Cohere, Granite) are scored with the
same transform as the model's own forward (mio_kernels.transform.head_transform); for them the
logits/* metrics (mean of each token's logits, taken from the mean weight row) are not logged.

Requires `trl>=1.16` (from a checkout: `pip install -e ".[trl]"`).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from datasets import Dataset

from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter
from accelerate.utils import is_peft_model

from mio_kernels.function import fused_mio_loss, linear_logprobs
from mio_kernels.transform import head_transform
from mio_kernels.losses import get_loss

# TRL loss name -> the op's loss_type (same formula). The op's own names are accepted as they are.
TRL_LOSS_TYPES = {"sigmoid": "dpo", "nca_pair": "mio", "ipo": "ipo", "hinge": "hinge", "robust": "robust",
                  "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "apo_zero": "apo_zero",
                  "mio": "mio", "dpo": "dpo"}
IGNORE_INDEX = -100


def _carry_checkpointing_names(config) -> None:
    """TRL's configs default `gradient_checkpointing` (to True), which transformers deprecates in favour of
    `activation_checkpointing` with a FutureWarning at every construction: carry the value over to the
    new name first, so the same setting takes effect and nothing warns."""
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if hasattr(config, new) and getattr(config, new) is None and getattr(config, old, None) is not None:
            setattr(config, new, getattr(config, old))


@dataclass
class MIOConfig(DPOConfig):
    """`DPOConfig` plus the fused op's options; every DPOConfig option MIOTrainer cannot honour is refused here."""

    num_negatives: int = field(default=1, metadata={"help": "K rejected responses per prompt (dataset `rejected`: "
                                                            "a list of K responses when K > 1)."})
    mio_backend: str = field(default="auto", metadata={"help": "fused_mio_loss backend: auto, triton, native, "
                                                               "reference."})

    def __post_init__(self):
        _carry_checkpointing_names(self)
        super().__post_init__()
        check_trl_options(self)


def check_trl_options(args: DPOConfig) -> str:
    """The op's loss_type for these TRL options, or a ValueError naming the option it cannot honour."""
    loss_types = list(args.loss_type) if not isinstance(args.loss_type, str) else [args.loss_type]
    if len(loss_types) != 1:
        raise ValueError(f"MIOTrainer: loss_type must be a single loss, got the mix {loss_types}")
    if args.loss_weights is not None and list(args.loss_weights) != [1.0]:
        raise ValueError(f"MIOTrainer: loss_weights={args.loss_weights} is not supported (one loss, weight 1)")
    name = loss_types[0]
    if name not in TRL_LOSS_TYPES:
        raise ValueError(f"MIOTrainer: loss_type must be one of {sorted(TRL_LOSS_TYPES)}, got {name!r}")
    k = getattr(args, "num_negatives", 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"MIOTrainer: num_negatives must be an integer >= 1, got {k!r}")
    if k > 1 and name == "nca_pair":
        raise ValueError("MIOTrainer: nca_pair is mio at K = 1; use loss_type='mio' with num_negatives > 1")
    refused = {"ld_alpha": args.ld_alpha is not None, "use_weighting": bool(args.use_weighting),
               "rpo_alpha": getattr(args, "rpo_alpha", None) is not None,
               "f_divergence_type": args.f_divergence_type != "reverse_kl"}
    for option, bad in refused.items():
        if bad:
            raise ValueError(f"MIOTrainer: {option}={getattr(args, option)!r} is not supported by the fused loss")
    op_loss = TRL_LOSS_TYPES[name]
    if args.label_smoothing and not get_loss(op_loss).uses_label_smoothing:
        raise ValueError(f"MIOTrainer: label_smoothing={args.label_smoothing} only applies to loss_type='robust', "
                         f"not {name!r}")
    return op_loss


# ------------------------------------------------------------------------------------------------ data


def _as_list(rejected_ids) -> List[List[int]]:
    """One example's rejected_ids: [ids] (TRL's single response) or [[ids] * K]."""
    return [rejected_ids] if not rejected_ids or isinstance(rejected_ids[0], int) else list(rejected_ids)


@dataclass
class DataCollatorForKPreference(DataCollatorForPreference):
    """TRL's preference collator for K rejected responses per prompt: rows are the P chosen, then K
    blocks of P rejected (the op's layout; K = 1 is TRL's). ref_rejected_logps become [P, K]."""

    num_negatives: int = 1

    def torch_call(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        k = self.num_negatives
        blocks = []
        for j in range(k):
            block = []
            for ex in examples:
                rejected = _as_list(ex["rejected_ids"])
                if len(rejected) != k:
                    raise ValueError(f"an example has {len(rejected)} rejected responses, expected num_negatives={k}")
                block.append({"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"],
                              "rejected_ids": rejected[j]})
            blocks.append(super().torch_call(block))
        width = max(b["input_ids"].shape[1] for b in blocks)
        out = {}
        for key in ("input_ids", "attention_mask", "completion_mask"):
            fill = self.pad_token_id if key == "input_ids" else 0
            rows = [_pad_to(b[key], width, fill) for b in blocks]
            p = len(examples)
            out[key] = torch.cat([rows[0][:p]] + [r[p:] for r in rows])
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            out["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples]).reshape(-1, k)
        return out


# transformers deprecates the gradient_checkpointing* names that TRL's helper still calls
_CHECKPOINTING_DEPRECATION = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"


@contextlib.contextmanager
def _no_checkpointing(model, kwargs):
    """TRL's disable_gradient_checkpointing, without the FutureWarnings of the names it calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CHECKPOINTING_DEPRECATION, category=FutureWarning)
        with disable_gradient_checkpointing(model, kwargs):
            yield


@contextlib.contextmanager
def _progress_bars(enabled: Optional[bool]):
    """`datasets`' progress bars off (False) inside the block, or as they are (None); restored after."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    if enabled is False and was:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not ds_logging.is_progress_bar_enabled():
            ds_logging.enable_progress_bar()


def _pad_to(t: Tensor, width: int, fill: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)


def _kth_rejected(example, k):
    return {"rejected": example["rejected"][k]}


def _merge_k(examples_k: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One example's K tokenizations -> a common prompt (the shortest) and K rejected_ids."""
    prompt_len = min(len(ex["prompt_ids"]) for ex in examples_k)
    first = examples_k[0]
    return {"prompt_ids": first["prompt_ids"][:prompt_len],
            "chosen_ids": first["prompt_ids"][prompt_len:] + first["chosen_ids"],
            "rejected_ids": [ex["prompt_ids"][prompt_len:] + ex["rejected_ids"] for ex in examples_k]}


# ------------------------------------------------------------------------------------------------ model head


def _add_mio_head(model) -> None:
    """`model(..., labels=labels, mio_head=fn)` runs the backbone only and returns
    fn(hidden [S, T-1, H], weight [V, H], bias, labels [S, T-1]) (shifted); without `mio_head` the
    forward is the previous one. Patched once, on the module under any PEFT/accelerate wrapper, so
    calls through the wrappers keep their hooks (FSDP2's included)."""
    if getattr(model, "_mio_head_patched", False):
        return
    previous = model.forward

    def forward(*args, mio_head: Optional[Callable] = None, **kwargs):
        if mio_head is None:
            return previous(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("fused_lm_head", None)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2: a DTensor, gathered once per step as TRL does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        if weight.dtype != hidden.dtype:  # mixed precision: the head runs in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return mio_head(hidden, weight.to(hidden.device), None if bias is None else bias.to(hidden.device),
                            labels[:, 1:].to(hidden.device))

    model.forward = forward
    model._mio_head_patched = True


def _labels_and_model_kwargs(inputs: Dict[str, Tensor]):
    """Labels (completion tokens, unshifted) and the model's own inputs of a collated batch."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    return labels, dict(kwargs, use_cache=False)


def _sequence_sums(hidden, weight, bias, labels, backend: str, head_options: Dict[str, Any]) -> Dict[str, Tensor]:
    token_logps = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, backend=backend,
                                  **head_options)
    # summed in float64 like the op's own sequence reduction, so a policy equal to its reference has
    # rewards of exactly 0 (then cast to fp32 like the op's policy_logps)
    return {"sums": token_logps.double().sum(-1).float()}


# ------------------------------------------------------------------------------------------------ trainer


class MIOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose loss is `fused_mio_loss` (see the module docstring for what maps and
    what is refused). Same arguments as DPOTrainer; `args` a `MIOConfig` (a plain `DPOConfig` is
    checked the same way, with num_negatives = 1)."""

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            raise ValueError("MIOTrainer: pass args=MIOConfig(...)")
        self._op_loss = check_trl_options(args)
        self.num_negatives = getattr(args, "num_negatives", 1)
        self.mio_backend = getattr(args, "mio_backend", "auto")
        if not isinstance(model, str):
            head_transform(model)  # refuse a head the op cannot express before TRL loads anything
        if data_collator is None and processing_class is not None:
            tok = getattr(processing_class, "tokenizer", processing_class)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            data_collator = DataCollatorForKPreference(pad_token_id=pad, max_length=args.max_length,
                                                       truncation_mode=args.truncation_mode,
                                                       pad_to_multiple_of=args.pad_to_multiple_of,
                                                       num_negatives=self.num_negatives)
        loads_reference = (ref_model is None and not args.precompute_ref_log_probs and kwargs.get("peft_config") is None
                           and not (not isinstance(model, str) and is_peft_model(model)))
        try:
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
        except OSError as err:
            if not loads_reference:
                raise
            # TRL loads the reference from the policy's config path: '' for a model built in memory
            path = getattr(getattr(model, "config", None), "_name_or_path", model)
            raise ValueError(f"MIOTrainer: ref_model=None, so TRL loads the reference model from the policy's path "
                             f"{path!r}, which failed ({' '.join(str(err).split())[:160]}): pass ref_model= (e.g. "
                             "copy.deepcopy(model) before training) or precompute_ref_log_probs=True") from err
        if self._is_vision_dataset:
            raise ValueError("MIOTrainer: vision datasets are not supported")
        if self.aux_loss_enabled:
            raise ValueError("MIOTrainer: MoE router aux losses are not supported (set router_aux_loss_coef=0)")

    @property
    def head_options(self) -> Dict[str, Any]:
        """The model's logit transform (Gemma's softcapping, Cohere/Granite scales), read once; a
        property because TRL precomputes reference log-probs inside its own __init__."""
        if getattr(self, "_head_options", None) is None:
            self._head_options = head_transform(self.model)
        return self._head_options

    # -------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation; a `rejected` list of K responses is tokenized response by response."""
        first = next(iter(dataset))
        multi = ("rejected" in first and isinstance(first["rejected"], list) and first["rejected"]
                 and not isinstance(first["rejected"][0], dict))
        if "prompt_ids" in first or not multi:
            if self.num_negatives > 1 and "prompt_ids" not in first:
                raise ValueError(f"MIOTrainer: num_negatives={self.num_negatives} needs a dataset whose `rejected` "
                                 "is a list of that many responses")
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not isinstance(dataset, Dataset):
            raise ValueError("MIOTrainer: K rejected responses per prompt need a map-style Dataset")
        if len(first["rejected"]) != self.num_negatives:
            raise ValueError(f"MIOTrainer: the {dataset_name} dataset has {len(first['rejected'])} rejected responses "
                             f"per prompt, but num_negatives={self.num_negatives}")
        unfiltered = copy.copy(args)
        unfiltered.max_length = None  # rows are filtered once, after merging
        per_k = []
        for k in range(self.num_negatives):  # TRL's preparation bars are shown once, not K times
            with _progress_bars(False):
                one = dataset.map(_kth_rejected, fn_kwargs={"k": k})
            with _progress_bars(None if k == 0 else False):
                per_k.append(super(MIOTrainer, self)._prepare_dataset(one, processing_class, unfiltered, dataset_name))
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        per_k = [[dict(zip(columns, row)) for row in zip(*(ds[c] for c in columns))] for ds in per_k]
        merged = Dataset.from_list([_merge_k(list(rows)) for rows in zip(*per_k)])
        if args.max_length is not None and args.truncation_mode == "keep_start":
            with _progress_bars(False):
                merged = merged.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
        return merged

    # -------------------------------------------------------------------------------- reference
    def _patched(self, model):
        """`model` (maybe wrapped) with the mio head on its HF causal LM."""
        inner = self.accelerator.unwrap_model(model)
        _add_mio_head(inner.get_base_model() if is_peft_model(inner) else inner)
        return model

    def _reference_sums(self, model, labels: Tensor, model_kwargs: Dict[str, Any], precompute: bool) -> Tensor:
        """[S] reference log-prob sums of a batch from `model`: the reference model, or the policy
        (with its adapter disabled under PEFT), under the accelerator's autocast when precomputing (as TRL)."""
        adapter = contextlib.nullcontext()
        inner = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and is_peft_model(inner):
            adapter = use_adapter(inner, adapter_name="ref" if "ref" in inner.peft_config else None)
        backend = self.mio_backend
        head = lambda h, w, b, y: _sequence_sums(h, w, b, y, backend, self.head_options)  # noqa: E731
        with torch.no_grad(), _no_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, (self.accelerator.autocast() if precompute else contextlib.nullcontext()):
            return self._patched(model)(**model_kwargs, labels=labels, mio_head=head)["sums"].float()

    def compute_ref_log_probs(self, model, inputs):
        """(chosen [P], rejected [P] or [P, K]) reference sums of one padded batch (precompute_ref_log_probs)."""
        labels, kwargs = _labels_and_model_kwargs(inputs)
        blocks = self._reference_sums(model, labels, kwargs, precompute=True).view(1 + self.num_negatives, -1)
        rejected = blocks[1:].T
        return blocks[0], (rejected[:, 0] if self.num_negatives == 1 else rejected)

    # -------------------------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels, kwargs = _labels_and_model_kwargs(inputs)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"].reshape(-1),
                             inputs["ref_rejected_logps"].reshape(len(inputs["ref_chosen_logps"]), -1).T.reshape(-1)])
        else:
            ref = self._reference_sums(self.ref_model or self.model, labels, kwargs, precompute=False)
        out = self._patched(model)(**kwargs, labels=labels, mio_head=self._loss_head(ref.float()))
        self._log_metrics(mode, out, ref, inputs)
        if return_outputs:
            with torch.no_grad():
                return out["loss"], model(**kwargs)
        return out["loss"]

    def _loss_head(self, ref: Tensor) -> Callable:
        args = self.args

        def head(hidden, weight, bias, labels):
            out = fused_mio_loss(hidden, weight, labels, bias=bias, ref_logps=ref.to(hidden.device),
                                 loss_type=self._op_loss, beta=args.beta, num_negatives=self.num_negatives,
                                 label_smoothing=args.label_smoothing, ignore_index=IGNORE_INDEX,
                                 backend=self.mio_backend, **self.head_options)
            with torch.no_grad():  # mean over the vocabulary of each token's logits (TRL's logits/*)
                mean_logits = hidden.float() @ weight.float().mean(0)
                if bias is not None:
                    mean_logits = mean_logits + bias.float().mean()
            counts = (labels != IGNORE_INDEX).sum(-1)
            return {"loss": out.loss, "policy_sums": out.policy_sums, "counts": counts,
                    "logit_sums": (mean_logits * (labels != IGNORE_INDEX)).sum(-1)}
        return head

    def _log_metrics(self, mode: str, out: Dict[str, Tensor], ref: Tensor, inputs: Dict[str, Tensor]) -> None:
        """TRL's metric names, in TRL's units (sequence sums) for every loss."""
        gather, metrics, k = self.accelerator.gather_for_metrics, self._metrics[mode], self.num_negatives
        counts = out["counts"].float()
        sums, ref = out["policy_sums"].float().view(1 + k, -1), ref.to(counts.device).float().view(1 + k, -1)
        rewards = self.args.beta * (sums - ref)
        chosen, rejected = rewards[0], rewards[1:]
        per_prompt = {"rewards/chosen": chosen, "rewards/rejected": rejected.mean(0),
                      "rewards/accuracies": (chosen > rejected.max(0).values).float(),
                      "rewards/margins": chosen - rejected.mean(0),
                      "logps/chosen": sums[0], "logps/rejected": sums[1:].mean(0)}
        for name, value in per_prompt.items():
            metrics[name].append(gather(value).mean().item())
        logit_sums, counts = out["logit_sums"].view(1 + k, -1), counts.view(1 + k, -1)
        # The mean logit comes from the mean weight row: exact for a linear head only.
        linear_head = self.head_options == dict(logit_scale=1.0, final_logit_softcapping=None)
        for name, rows in (("logits/chosen", slice(0, 1)), ("logits/rejected", slice(1, None))) * linear_head:
            total = gather(logit_sums[rows].sum()).sum().item()
            tokens = gather(counts[rows].sum()).sum().item()
            metrics[name].append(total / tokens if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


# ================================================================================================ GRPO

from trl import GRPOConfig as _TRLGRPOConfig  # noqa: E402
from trl import GRPOTrainer as _TRLGRPOTrainer  # noqa: E402

from mio_kernels import grpo_losses  # noqa: E402
from mio_kernels.backends import BACKEND_NAMES  # noqa: E402
from mio_kernels.grpo import fused_grpo_loss  # noqa: E402
from mio_kernels.single_pass import BACKWARD_MODES  # noqa: E402
from trl.trainer.utils import nanmax, nanmin  # noqa: E402


@dataclass
class MIOGRPOConfig(_TRLGRPOConfig):
    """`trl.GRPOConfig` plus the fused op's options; every GRPOConfig option MIOGRPOTrainer cannot honour
    is refused here (a plain GRPOConfig is checked the same way by the trainer)."""

    mio_backend: str = field(default="auto", metadata={"help": "fused_grpo_loss backend: auto, triton, native, "
                                                               "reference."})
    mio_backward_mode: str = field(default="auto", metadata={"help": "fused_grpo_loss backward_mode: auto, "
                                                                     "single_pass, recompute."})

    def __post_init__(self):
        _carry_checkpointing_names(self)
        super().__post_init__()
        check_grpo_options(self)


def check_grpo_options(args: _TRLGRPOConfig) -> None:
    """ValueError naming the GRPOConfig option the fused op cannot express."""
    if args.loss_type not in grpo_losses.LOSS_TYPES:
        raise ValueError(f"MIOGRPOTrainer: loss_type={args.loss_type!r} is not supported by the fused loss "
                         f"(one of {list(grpo_losses.LOSS_TYPES)})")
    refused = {
        # each needs the whole batch's log-probs / entropies before any token's coefficient is known
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        # Liger replaces the model's forward (TRL refuses its fused linear cross-entropy for the same reason)
        "use_liger_kernel": bool(args.use_liger_kernel),
    }
    for option, bad in refused.items():
        if bad:
            raise ValueError(f"MIOGRPOTrainer: {option}={getattr(args, option)!r} is not supported by the fused loss")
    backend = getattr(args, "mio_backend", "auto")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"MIOGRPOTrainer: mio_backend must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    mode = getattr(args, "mio_backward_mode", "auto")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"MIOGRPOTrainer: mio_backward_mode must be one of {', '.join(BACKWARD_MODES)}, got {mode!r}")
    if mode == "single_pass" and args.importance_sampling_level == "sequence":
        if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
            reason = "the entropy bonus (entropy_coef, use_adaptive_entropy) gives each token a gradient of its own"
        else:
            reason = grpo_losses.sequence_pass_blocker(grpo_losses.GRPOConfig(
                loss_type=args.loss_type, beta=args.beta, importance_sampling_level="sequence"))
        if reason is not None:
            raise ValueError(f"MIOGRPOTrainer: mio_backward_mode='single_pass' cannot run with "
                             f"importance_sampling_level='sequence': {reason}")


def _grpo_batch(inputs):
    """TRL's generation batch -> (input_ids, attention_mask, labels scoring the completion's kept tokens,
    the completion's loss mask (tool-call tokens masked out as TRL does))."""
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    width = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :-width] = IGNORE_INDEX
    labels[:, -width:] = labels[:, -width:].masked_fill(mask == 0, IGNORE_INDEX)
    return input_ids, attention_mask, labels, mask


class MIOGRPOTrainer(_TRLGRPOTrainer):
    """`trl.GRPOTrainer` whose per-token log-probs, entropies and loss come from `fused_grpo_loss` on
    the backbone's last hidden states and the LM head weight (the logits are never whole). Same
    arguments as GRPOTrainer; `args` a `MIOGRPOConfig` (or a plain `GRPOConfig`, checked the same way).

    Generation, rewards, advantages and the reference / old log-probs are TRL's own. The training
    loss, its gradient-accumulation and process scaling, the entropy bonus (static or adaptive) and
    the logged metrics (kl, entropy, clip_ratio/*, cispo_clip_ratio, policy_loss, entropy_coef) are
    TRL's, in TRL's units and cross-process reductions. Refused at construction: top_entropy_quantile
    < 1, off_policy_mask_threshold, loss_type='vespo', use_liger_kernel, MoE router aux losses,
    vision inputs, and heads the op cannot express."""

    def __init__(self, model, reward_funcs=None, args: Optional[_TRLGRPOConfig] = None, *posargs, **kwargs):
        if args is None:
            raise ValueError("MIOGRPOTrainer: pass args=MIOGRPOConfig(...)")
        check_grpo_options(args)
        if not isinstance(model, str):
            head_transform(model)  # refuse a head the op cannot express before TRL loads anything
        processing_class = kwargs.get("processing_class", posargs[2] if len(posargs) > 2 else None)
        from transformers import ProcessorMixin
        if isinstance(processing_class, ProcessorMixin):
            raise ValueError("MIOGRPOTrainer: vision-language processors (multimodal inputs) are not supported")
        self.mio_backend = getattr(args, "mio_backend", "auto")
        self.mio_backward_mode = getattr(args, "mio_backward_mode", "auto")
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("MIOGRPOTrainer: MoE router aux losses are not supported (set router_aux_loss_coef=0)")
        self._head_options = head_transform(self.accelerator.unwrap_model(self.model))

    def _patched(self, model):
        inner = self.accelerator.unwrap_model(model)
        _add_mio_head(inner.get_base_model() if is_peft_model(inner) else inner)
        return model

    def _compute_loss(self, model, inputs):
        """TRL's `_compute_loss` with the policy's log-probs, entropies and loss from the fused op."""
        for key in ("pixel_values", "image_grid_thw", "num_images", "token_type_ids", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                raise ValueError(f"MIOGRPOTrainer: multimodal input {key!r} is not supported")
        args, mode = self.args, ("train" if self.model.training else "eval")
        input_ids, attention_mask, labels, mask = _grpo_batch(inputs)
        width = inputs["completion_ids"].size(1)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            # TRL divides by num_items / processes * accumulation / steps_per_generation (train); the op's
            # loss is divided by the accumulation below, with the entropy bonus, as TRL's
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items / args.steps_per_generation
        advantages = inputs["advantages"]
        importance = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            importance = inputs["importance_sampling_ratio"]
            if importance.dim() == 2 and importance.shape[1] == 1:
                importance = importance[:, 0]
        options = dict(advantages=advantages, old_logps=inputs.get("old_per_token_logps"),
                       ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
                       importance_weights=importance, loss_type=self.loss_type, epsilon_low=self.epsilon_low,
                       epsilon_high=self.epsilon_high, delta=args.delta, beta=self.beta,
                       importance_sampling_level=self.importance_sampling_level, entropy_coef=self._current_entropy_coef(),
                       max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
                       temperature=self.temperature, use_bias_correction_kl=args.use_bias_correction_kl,
                       sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
                       ignore_index=IGNORE_INDEX, backend=self.mio_backend, backward_mode=self.mio_backward_mode,
                       log_entropy=True, **self._head_options)
        cast_fp32 = bool(args.cast_lm_head_to_fp32)

        def head(hidden, weight, bias, shifted):
            hidden, shifted = hidden[:, -width:], shifted[:, -width:]  # the completion's positions
            if cast_fp32:
                hidden, weight = hidden.float(), weight.float()
                bias = None if bias is None else bias.float()
            out = fused_grpo_loss(hidden, weight, shifted, bias=bias, **options)
            return {"loss": out.loss, "logps": out.token_logps, "entropy": out.token_entropy,
                    "policy_loss": out.metrics.get("policy_loss", out.loss.detach())}

        with self.accelerator.autocast():
            out = self._patched(model)(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                       mio_head=head)
        loss = out["loss"] / accumulation
        self._log_grpo_metrics(mode, out, inputs, mask, accumulation)
        return loss

    def _current_entropy_coef(self) -> float:
        """The entropy bonus's coefficient for this step, as TRL's (static, or adaptive: on while the last
        window's entropy is at or under the target)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    def _log_entropy_bonus(self, mode, out, entropies, mask, accumulation) -> None:
        """TRL's policy_loss and entropy_coef metrics and its adaptive-entropy window update."""
        args, metrics = self.args, self._metrics[mode]
        policy_loss = out["policy_loss"].detach().float()
        if self.loss_type in ("dapo", "cispo"):  # TRL's policy_loss is after its normaliser
            policy_loss = policy_loss / accumulation
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
            self._entropy_window_stats = (stats if self._entropy_window_stats is None
                                          else self._entropy_window_stats + stats)
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)

    def _log_grpo_metrics(self, mode, out, inputs, mask, accumulation) -> None:
        """TRL's `_compute_loss` metrics and adaptive-entropy update, from the op's detached per-token
        log-probs and entropies (same names, units and cross-process reductions)."""
        args, metrics = self.args, self._metrics[mode]
        per_token_logps, entropies = out["logps"].detach(), out["entropy"].detach()
        mask = mask.to(per_token_logps.dtype)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        old = per_token_logps if old is None else old
        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "token":
            log_weights = log_ratio
        else:
            log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_weights)

        if self._entropy_bonus_enabled:
            self._log_entropy_bonus(mode, out, entropies, mask, accumulation)

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if args.use_bias_correction_kl:
                kl = kl * coef_1
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropies))
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            if args.delta is not None:
                coef_1 = torch.clamp(coef_1, max=args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).float()
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped))
