"""MIOGRPOTrainer against TRL 1.16's own GRPOTrainer (real TRL, no mocks): a tiny Llama built from
a config, the local word-level tokenizer, a few shipped arithmetic prompts and a deterministic
reward; fp32 on CPU (bf16=False: GRPOConfig defaults to bf16 autocast, which puts TRL's own
log-probs ~7e-4 off float64), use_vllm=False.

Both trainers are seeded identically, so they sample the same completions (checked at every step),
and run 3 optimizer steps with num_iterations=2 (so the second step of each generation is off-policy
and the clip metrics are not trivially 0).

Bounds, from TRL's own precision (`test_precision_against_float64` measures it on a captured batch):
on this model TRL 1.16's chunked LM head gives per-token log-probs up to ~6e-7 (absolute) off a
float64 evaluation of the same batch, its loss ~2e-8 (absolute: the GRPO loss is a difference of
advantage-weighted terms of size ~|A| |log p| ~ 5, summing to ~0 on-policy) and its gradient
~2e-7 (relative); the fused op is as close (~2e-7 relative gradient, ~1e-9 loss). So losses agree
to LOSS_ATOL, metrics (entropy, kl, grad_norm) to RTOL, the clip metrics (counts of tokens) exactly
up to rounding, and the parameters after 3 plain-SGD steps to RTOL relative to their norm.
"""
import copy
import json
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mio_kernels.data import ARITHMETIC_TRAIN  # noqa: E402
from mio_kernels.integrations.trl import MIOGRPOConfig, MIOGRPOTrainer  # noqa: E402
from mio_kernels.train.model import build_tiny_llama, builtin_tokenizer  # noqa: E402

LOSS_ATOL = 1e-6     # TRL's own loss: ~2e-8 off float64
RTOL = 1e-5          # TRL's gradient ~2e-7 off float64, its log-probs ~1e-7 relative
PROMPTS = 4
WORST = {}  # the largest differences seen (printed by compare; pytest -s)
COMPARED = ("grad_norm", "entropy", "kl", "reward", "reward_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "policy_loss",
            "entropy_coef", "num_tokens", "completions/mean_length")


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def prompts(n=PROMPTS):
    out = []
    with open(ARITHMETIC_TRAIN) as f:
        for line in f:
            out.append({"prompt": json.loads(line)["prompt"]})
            if len(out) == n:
                return datasets.Dataset.from_list(out)


def reward(completions, **kwargs):
    """Deterministic and varied within a group: the completion's length modulo 3."""
    return [float(len(c) % 3) for c in completions]


def tiny_model(tokenizer, save_to=None):
    torch.manual_seed(0)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    if save_to is not None:  # beta > 0: TRL builds the reference from the policy's path (no ref_model argument)
        model.save_pretrained(str(save_to))
        model.config._name_or_path = str(save_to)
    return model


def options(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                max_steps=3, num_iterations=2, epsilon=0.002, learning_rate=0.05, optim="sgd", logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    base.setdefault("activation_checkpointing", base.pop("gradient_checkpointing", False))
    return base


class Recording:
    """Records each micro-batch's completions and loss."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if model.training:
            self.record.append((inputs["completion_ids"].clone(), loss.item()))
        return loss


class RecordingTRL(Recording, trl.GRPOTrainer):
    record = None


class RecordingMIO(Recording, MIOGRPOTrainer):
    record = None


def run(cls, config_cls, tokenizer, out, model=None, data=None, **kw):
    trainer = cls(model=model if model is not None else tiny_model(tokenizer), reward_funcs=reward,
                  args=config_cls(**options(out, **kw)), train_dataset=data or prompts(), processing_class=tokenizer)
    trainer.record = []
    trainer.train()
    return trainer


def pair(tokenizer, tmp_path, make_model=None, **kw):
    make_model = make_model or (lambda name: tiny_model(tokenizer, tmp_path / f"{name}-init" if kw.get("beta") else None))
    ours = run(RecordingMIO, MIOGRPOConfig, tokenizer, tmp_path / "mio", model=make_model("mio"), **kw)
    theirs = run(RecordingTRL, trl.GRPOConfig, tokenizer, tmp_path / "trl", model=make_model("trl"), **kw)
    return ours, theirs


def compare(ours, theirs):
    assert len(ours.record) == len(theirs.record) > 0
    for step, ((ids_a, loss_a), (ids_b, loss_b)) in enumerate(zip(ours.record, theirs.record)):
        assert torch.equal(ids_a, ids_b), f"micro-batch {step}: the runs sampled different completions"
        assert abs(loss_a - loss_b) <= LOSS_ATOL, f"loss of micro-batch {step}: {loss_a} vs TRL {loss_b}"
        WORST["loss (abs)"] = max(WORST.get("loss (abs)", 0.0), abs(loss_a - loss_b))
    logs_a = [h for h in ours.state.log_history if "grad_norm" in h]
    logs_b = [h for h in theirs.state.log_history if "grad_norm" in h]
    assert len(logs_a) == len(logs_b) == ours.args.max_steps
    for step, (a, b) in enumerate(zip(logs_a, logs_b)):
        names = [n for n in COMPARED if n in b]
        assert "entropy" in names and [n for n in COMPARED if n in a] == names, (step, sorted(a), sorted(b))
        for name in names:
            assert math.isclose(a[name], b[name], rel_tol=RTOL, abs_tol=1e-6), \
                f"{name} at step {step}: {a[name]} vs TRL {b[name]}"
            diff = abs(a[name] - b[name]) / max(abs(b[name]), 1e-6)
            WORST[name + " (rel)"] = max(WORST.get(name + " (rel)", 0.0), diff)
    for (name, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert (p - q).norm() <= RTOL * q.norm() + 1e-7, name
        WORST["parameters (rel)"] = max(WORST.get("parameters (rel)", 0.0), ((p - q).norm() / q.norm()).item())
    print("worst differences so far:", {k: f"{v:.2e}" for k, v in WORST.items()})
    return logs_b


CASES = {"grpo": dict(loss_type="grpo"), "dapo": dict(loss_type="dapo"), "dr_grpo": dict(loss_type="dr_grpo"),
         "cispo": dict(loss_type="cispo", epsilon_high=1.001),
         "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)}


@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no-kl", "kl"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(tokenizer, tmp_path, case, beta):
    ours, theirs = pair(tokenizer, tmp_path, beta=beta, **CASES[case])
    logs = compare(ours, theirs)
    assert ("kl" in logs[0]) == (beta > 0)
    moved = sum((p - q).norm() for p, q in zip(ours.model.parameters(), tiny_model(ours.processing_class).parameters()))
    assert moved > 0  # the steps trained something


@pytest.mark.parametrize("kw", [
    dict(loss_type="dapo", per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
         entropy_coef=0.01, delta=1.5, epsilon_high=0.05, temperature=0.7, beta=0.05),
    dict(loss_type="grpo", per_device_train_batch_size=2, gradient_accumulation_steps=2, use_adaptive_entropy=True,
         entropy_coef=0.01, entropy_target=6.0, num_iterations=1, temperature=1.3),
    dict(loss_type="bnpo", steps_per_generation=2, per_device_train_batch_size=2, delta=1.2),
    dict(loss_type="cispo", per_device_train_batch_size=2, steps_per_generation=2, gradient_accumulation_steps=2,
         epsilon_high=1.001, entropy_coef=-0.02),
], ids=["dapo-ga-ckpt-entropy-delta-temp-kl", "grpo-adaptive-entropy", "bnpo-steps-per-generation",
        "cispo-ga-spg-entropy"])
def test_options_match_trl(tokenizer, tmp_path, kw):
    """Gradient accumulation, steps_per_generation, checkpointing, entropy bonus (static / adaptive),
    delta, epsilon_high and the sampling temperature: TRL's loss scaling and metrics."""
    ours, theirs = pair(tokenizer, tmp_path, **kw)
    logs = compare(ours, theirs)
    if kw.get("entropy_coef"):
        assert "policy_loss" in logs[0] and "entropy_coef" in logs[0]


def test_peft_matches_trl(tokenizer, tmp_path):
    """LoRA; with beta > 0 TRL's reference is the policy with the adapter disabled."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    results = []
    for cls, cfg, name in ((RecordingMIO, MIOGRPOConfig, "mio"), (RecordingTRL, trl.GRPOConfig, "trl")):
        trainer = cls(model=tiny_model(tokenizer), reward_funcs=reward,
                      args=cfg(**options(tmp_path / name, learning_rate=0.5, beta=0.1, gradient_checkpointing=True)),
                      train_dataset=prompts(), processing_class=tokenizer, peft_config=config)
        trainer.record = []
        trainer.train()
        results.append(trainer)
    logs = compare(*results)
    assert logs[-1]["kl"] > 0  # the adapter moved the policy away from its reference


def test_precision_against_float64(tokenizer, tmp_path):
    """How the bounds above were measured: on one captured batch (step 0, on-policy), TRL's loss
    and gradient vs a float64 evaluation (full logits, model in float64), and ours vs the same."""
    captured = {}

    class Capture(trl.GRPOTrainer):
        def _compute_loss(self, model, inputs):
            captured.setdefault("inputs", inputs)
            return super()._compute_loss(model, inputs)

    trl_trainer = Capture(model=tiny_model(tokenizer), reward_funcs=reward,
                          args=trl.GRPOConfig(**options(tmp_path / "trl", max_steps=1, num_iterations=1,
                                                        loss_type="cispo", epsilon_high=5.0, learning_rate=0.0)),
                          train_dataset=prompts(), processing_class=tokenizer)
    trl_trainer.train()
    ours = MIOGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward,
                          args=MIOGRPOConfig(**options(tmp_path / "mio", max_steps=1, num_iterations=1,
                                                       loss_type="cispo", epsilon_high=5.0, learning_rate=0.0)),
                          train_dataset=prompts(), processing_class=tokenizer)
    ours.train()  # sets the trainer's step state (accumulation steps); lr = 0 leaves the weights
    inputs = captured["inputs"]

    def loss_and_grad(trainer, model, fn):
        model.zero_grad()
        loss = fn(model)
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])

    def float64_loss(model):  # TRL's cispo loss, on-policy, from the model's full logits
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        width = inputs["completion_ids"].shape[1]
        hidden = model.model(input_ids=ids, attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                             use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)[:, -width - 1:-1]
        logps = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
        mask = inputs["completion_mask"].double()
        per_token = -inputs["advantages"].double()[:, None] * logps  # min(w, 5) = 1 on-policy
        return (per_token * mask).sum() / inputs["num_items_in_batch"].double()

    exact = tiny_model(tokenizer).double()
    loss64, grad64 = loss_and_grad(None, exact, float64_loss)
    loss_trl, grad_trl = loss_and_grad(trl_trainer, trl_trainer.model, lambda m: trl_trainer._compute_loss(m, inputs))
    loss_mio, grad_mio = loss_and_grad(ours, ours.model, lambda m: ours._compute_loss(m, inputs))
    rel = lambda g: ((g - grad64).norm() / grad64.norm()).item()  # noqa: E731
    trl_loss_err, trl_grad_err = abs(loss_trl - loss64), rel(grad_trl)
    assert trl_loss_err <= LOSS_ATOL / 10 and trl_grad_err <= RTOL / 10  # the bounds hold 10x over for TRL itself
    assert abs(loss_mio - loss64) <= max(2 * trl_loss_err, 1e-8)
    assert rel(grad_mio) <= max(2 * trl_grad_err, 1e-6)


@pytest.mark.parametrize("option, match", [
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(use_liger_kernel=True), "use_liger_kernel"),
    (dict(mio_backward_mode="single_pass", importance_sampling_level="sequence", beta=0.1), "KL term"),
    (dict(mio_backward_mode="single_pass", importance_sampling_level="sequence", use_adaptive_entropy=True),
     "entropy bonus"),
    (dict(mio_backward_mode="single_pass", importance_sampling_level="sequence", loss_type="cispo"), "cispo"),
    (dict(mio_backend="cuda"), "mio_backend"),
    (dict(mio_backward_mode="twice"), "mio_backward_mode"),
])
def test_refused_options(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        MIOGRPOConfig(**options(tmp_path, **option))


def test_plain_config_refused_at_construction(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        MIOGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward,
                       args=trl.GRPOConfig(**options(tmp_path, top_entropy_quantile=0.5)),
                       train_dataset=prompts(), processing_class=tokenizer)
    model = tiny_model(tokenizer)
    model.config.output_multiplier_scale = 2.0
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        MIOGRPOTrainer(model=model, reward_funcs=reward, args=MIOGRPOConfig(**options(tmp_path)),
                       train_dataset=prompts(), processing_class=tokenizer)
