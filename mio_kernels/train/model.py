"""Models for the trainer: the embedded tiny Llama + local tokenizer, any HF causal LM, and the
wrapper that runs backbone -> fused loss so the [tokens, vocab] logits are never formed.

`PreferenceModel` holds the HF model's backbone (`get_decoder()`: embeddings, blocks, final
norm) and a `LMHeadLoss` holding its LM head. What the head computes is a `HeadTasks` method
(preference loss, sequence log-probs, SFT NLL, next-token logits), run inside `LMHeadLoss.forward`, so under
FSDP2 the head's weight is all-gathered by that module's own hooks: once per forward, not once
per chunk of the kernel (parallelize.py).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from mio_kernels import FusedMIOLoss, linear_logprobs
from mio_kernels.objective import PreferenceConfig
from mio_kernels.sequence import reduce_sequences
from mio_kernels.transform import head_transform

BUILTIN_MODEL = "builtin:tiny-llama"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Pre-tokens: a word, or a punctuation run, with its leading space (marked by the Metaspace "▁");
# every digit on its own, the first one of a number keeping the space ("▁8", "4"): numbers are
# digit strings and the model sees where each starts (this learned faster than a bare "▁").
_PRETOKEN = r"▁?[A-Za-z]+|▁?[0-9]|▁?[^A-Za-z0-9▁]+|▁"


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts: Iterable[str]):
    """A deterministic word-level tokenizer over `texts` (no download), as a PreTrainedTokenizerFast.

    With add_special_tokens (the default) an encoding starts with <s>, as Llama's does.
    Vocabulary: the special tokens, then every ASCII printable character with and without a
    leading space, then the pre-tokens of `texts` in sorted order. Decoding is exact for text made
    of known pre-tokens; an unknown word becomes <unk>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Split(Regex(_PRETOKEN), behavior="isolated"),
    ])
    chars = [chr(c) for c in range(33, 127)]
    vocab: Dict[str, int] = {}
    for tok in list(SPECIAL_TOKENS.values()) + ["▁"] + chars + ["▁" + c for c in chars]:
        vocab.setdefault(tok, len(vocab))
    words = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def builtin_tokenizer():
    """The tokenizer of the embedded job, built from the shipped arithmetic dataset's training file."""
    from mio_kernels.data import ARITHMETIC_TRAIN

    texts: List[str] = []
    with open(ARITHMETIC_TRAIN) as f:
        for line in f:
            row = json.loads(line)
            texts += [row["prompt"], row["chosen"], *row["rejected"]]
    return build_tokenizer(texts)


# ----------------------------------------------------------------------------- models

def build_tiny_llama(tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     intermediate_size: int = 384, max_positions: int = 256):
    """A small Llama-architecture causal LM from a config (random init; seed torch first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def load_model_and_tokenizer(model: str, tokenizer: Optional[str] = None, dtype: str = "float32",
                             tiny: Optional[dict] = None):
    """(HF causal LM, tokenizer). `model` is BUILTIN_MODEL, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if model == BUILTIN_MODEL:
        tok = builtin_tokenizer() if tokenizer is None else AutoTokenizer.from_pretrained(tokenizer)
        lm = build_tiny_llama(tok, **(tiny or {})).to(torch_dtype)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer or model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    if tok.pad_token_id is None:  # padding is never scored, any id will do
        tok.pad_token = tok.eos_token
    check_supported(lm)
    return lm, tok


# Config attributes that transform the logits in ways the op cannot express.
def check_supported(lm: nn.Module) -> None:
    """Refuse models whose logits the op cannot express: transform attributes it does not know
    (head_transform), or an output embedding that is not an nn.Linear."""
    head_transform(lm)
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(lm).__name__}'s output embedding is a {type(head).__name__}, not nn.Linear")


# Tokens of the two sequences the packing probe runs (short: it runs on the full model at start).
_PROBE_LENGTHS = (5, 3)


@torch.no_grad()
def packed_attention_problem(lm: nn.Module) -> Optional[str]:
    """Why `lm` cannot run padding-free, or None when it can.

    transformers builds a block-diagonal causal mask from packed position_ids (restarting at 0
    per sequence, no attention_mask) for its attention implementations (masking_utils for
    sdpa/eager/flex; flash-attention's varlen path from the position_ids), but a model may ignore
    position_ids (a recurrent layer, custom attention code). So this runs the model: the second
    of two packed sequences must get the hidden states it gets alone (fp32 rounding; 16-bit: 5e-2
    relative), which also checks that the positions restart.
    """
    backbone = lm.get_decoder()
    param = next(lm.parameters())
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(vocab, (n,), generator=g).to(param.device) for n in _PROBE_LENGTHS]
    positions = torch.cat([torch.arange(n) for n in _PROBE_LENGTHS]).to(param.device)
    training = lm.training
    lm.eval()
    try:
        packed = backbone(input_ids=torch.cat(seqs)[None], position_ids=positions[None], use_cache=False)
        alone = backbone(input_ids=seqs[1][None], use_cache=False)
    except Exception as err:  # noqa: BLE001 -- any failure means: not packable, said with its message
        return f"its forward fails on a packed row without attention_mask ({' '.join(str(err).split())[:200]})"
    finally:
        lm.train(training)
    second, ref = packed.last_hidden_state[0, _PROBE_LENGTHS[0]:].float(), alone.last_hidden_state[0].float()
    error = ((second - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
    tol = 1e-3 if param.dtype in (torch.float32, torch.float64) else 5e-2
    if not error <= tol:
        return (f"a packed sequence does not get the hidden states it gets alone (relative difference "
                f"{error:.2g}): its layers ignore the packed position_ids and let sequences see each other")
    return None


def check_packed_attention(lm: nn.Module) -> None:
    """Refuse a model that cannot run padding-free (see packed_attention_problem)."""
    problem = packed_attention_problem(lm)
    if problem is not None:
        cfg = lm.config
        raise ValueError(f"--padding-free: model type {cfg.model_type!r} ({type(lm).__name__}, attention "
                         f"{getattr(cfg, '_attn_implementation', None)!r}) cannot take packed sequences: "
                         f"{problem}. Use --no-padding-free (padded batches)")


def decoder_layers(backbone: nn.Module, lm: nn.Module) -> List[nn.Module]:
    """The transformer blocks (the model's `_no_split_modules` classes, else the largest ModuleList)."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in backbone.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# ----------------------------------------------------------------------------- the LM head

HeadTask = Callable[..., Dict[str, Tensor]]  # (hidden, weight, bias, **inputs) -> dict of tensors


class HeadTasks:
    """What the LM head computes, one method per use; each takes (hidden [S, T, H], weight [V, H],
    bias [V] | None) and its own inputs, and returns a plain dict of tensors. Padding-free:
    hidden [N, H] with labels [N] and cu_seqlens [S+1] (the op's packed layout).

    The preference loss is the op's own `FusedMIOLoss` module, configured once from the run's
    `PreferenceConfig` (which carries the model's logit transform, `head_transform`). No host-syncing value checks in the step (check_values=False): token ids
    are validated once, up front (Trainer: ids < vocab), and non-finite values are caught at log
    and checkpoint time.
    """

    def __init__(self, loss_cfg: PreferenceConfig, backend: str = "auto"):
        self.cfg, self.backend = loss_cfg, backend
        self.loss = FusedMIOLoss(**dataclasses.asdict(loss_cfg), backend=backend, check_values=False)
        self.transform_options = dict(temperature=loss_cfg.temperature, logit_scale=loss_cfg.logit_scale,
                                      final_logit_softcapping=loss_cfg.final_logit_softcapping)

    def preference(self, hidden, weight, bias, labels: Tensor, ref_logps: Optional[Tensor],
                   cu_seqlens: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The preference loss (+ SFT term) of one batch in the loss's row layout, and its metrics."""
        out = self.loss(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps)
        return {"loss": out.loss, "policy_logps": out.policy_logps, **out.metrics}

    def sequence_logps(self, hidden, weight, bias, labels: Tensor,
                       cu_seqlens: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """[S] fp32 sequence log-prob SUMS (what the op takes as ref_logps, for every loss type) and
        [S] scored-token counts (to apply a length-normalised loss's reduction to them)."""
        token_logps = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=self.cfg.ignore_index,
                                      backend=self.backend, **self.transform_options)
        seq = reduce_sequences(token_logps, labels, self.cfg.ignore_index, length_normalized=False,
                               cu_seqlens=cu_seqlens)
        return {"policy_logps": seq.token_sums.float(), "token_counts": seq.counts.float()}

    def token_nll(self, hidden, weight, bias, labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Summed NLL of the scored tokens (the SFT warm-up; a sum over tokens needs no cu_seqlens)."""
        token_logps = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=self.cfg.ignore_index,
                                      backend=self.backend, **self.transform_options)
        return {"nll_sum": -token_logps.sum()}

    @staticmethod
    def next_logits(hidden, weight, bias) -> Dict[str, Tensor]:
        """[S, V] fp32 raw logits of the last position only (greedy decoding: their argmax is that of
        the transformed logits, the transform being increasing for logit_scale > 0)."""
        last = hidden[:, -1]
        logits = last @ weight.T if bias is None else torch.addmm(bias, last, weight.T)
        return {"logits": logits.float()}


class LMHeadLoss(nn.Module):
    """The LM head; forward(hidden, task, **inputs) runs `task` on its weight (read here, and only
    here, so FSDP2's hooks on this module gather it once per forward). Outputs are plain dicts of
    tensors so FSDP2 finds them (pytrees) for its backward hooks."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: Tensor, task: HeadTask, **inputs) -> Dict[str, Tensor]:
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if weight.dtype != hidden.dtype:  # autocast: run the head in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return task(hidden, weight, bias, **inputs)


def cache_argument(backbone: nn.Module) -> str:
    """The backbone's keyword for a KV cache: `cache` (transformers 5.x), else `past_key_values`
    (older versions; 5.x still accepts it, with a FutureWarning)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PreferenceModel(nn.Module):
    """backbone (embeddings, blocks, final norm) + LMHeadLoss; the HF model is kept unregistered.

    forward(input_ids [S, T], attention_mask [S, T], task, **inputs) -> the task's dict, e.g.
    model(**batch, task=tasks.preference, ref_logps=ref). Labels (in `inputs`) are already
    shifted: labels[:, t] is the token after position t. Padding-free (data.collate_packed):
    input_ids and position_ids [1, N], no attention_mask, labels [N] and cu_seqlens [S+1]; the
    head then sees hidden [N, H].
    """

    def __init__(self, lm: nn.Module, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.backbone = lm.get_decoder()
        self.head = LMHeadLoss(lm.get_output_embeddings())
        self.__dict__["lm"] = lm  # not a submodule: its parameters are the backbone's and the head's
        self.autocast_dtype = autocast_dtype
        self.cache_arg = cache_argument(self.backbone)

    @property
    def tied(self) -> bool:
        return self.head.lm_head.weight is self.lm.get_input_embeddings().weight

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, task: HeadTask,
                position_ids: Optional[Tensor] = None, cache=None, **inputs) -> Dict[str, Tensor]:
        """`cache`: a transformers Cache (greedy decoding), updated in place; None: no cache.
        Padding-free: input_ids [1, N] with position_ids restarting per sequence and cu_seqlens."""
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=cache is not None, **({self.cache_arg: cache} if cache is not None else {}))
        hidden = out.last_hidden_state
        if self.autocast_dtype is not None:
            hidden = hidden.to(self.autocast_dtype)
        if inputs.get("cu_seqlens") is not None:  # one packed row [1, N, H] -> the op's [N, H]
            hidden = hidden[0]
        with torch.autocast(device_type, enabled=False):  # the fused op picks its own precisions
            return self.head(hidden, task, **inputs)
