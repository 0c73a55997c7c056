"""MIOTrainer against TRL's own DPOTrainer (real TRL, no mocks): a tiny Llama built from a config,
the local word-level tokenizer and a few shipped arithmetic rows; fp32 on CPU.

For each TRL loss the fused loss maps, the same seed, model and data give TRL's loss and metrics.
The bounds are TRL's own precision, not ours: in a training step TRL 1.16's chunked LM head gives
sequence log-probs ~1.3e-5 (relative) off a float64 evaluation of the same batch and gradients
~1.2e-4 off float64 autograd, where the fused op is within ~3e-8 and ~1.5e-6 (measured on this
model). So the first step agrees to TOL; after it the trainers hold weights ~1e-4 * lr * |g|
apart, which plain SGD at a small lr keeps small (Adam's first steps are sign-like and would
amplify it), and later steps agree to LATER_TOL, plus, for the loss and the rewards, what TRL's
log-prob error becomes through beta * (l - l_ref): a small difference of log-probs of ~100 nats,
whose rounding differs between CPUs (AVX2 vs AVX-512 kernels).
"""
import copy
import json
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mio_kernels import fused_mio_loss  # noqa: E402
from mio_kernels.data import ARITHMETIC_TRAIN  # noqa: E402
from mio_kernels.integrations.trl import MIOConfig, MIOTrainer  # noqa: E402
from mio_kernels.train.model import build_tiny_llama, builtin_tokenizer  # noqa: E402

ROWS = 6
TOL = 2e-5
LATER_TOL = 2e-4
COMPARED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "num_tokens")


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def rows(k=1, n=ROWS):
    out = []
    with open(ARITHMETIC_TRAIN) as f:
        for line in f:
            row = json.loads(line)
            out.append({"prompt": row["prompt"], "chosen": row["chosen"],
                        "rejected": row["rejected"][0] if k == 1 else row["rejected"][:k]})
            if len(out) == n:
                return datasets.Dataset.from_list(out)


def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def options(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.05, optim="sgd",
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, beta=0.5,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    # TRL's default gradient_checkpointing=True under its current name (the old one warns in transformers)
    base.setdefault("activation_checkpointing", base.pop("gradient_checkpointing", True))
    return base


class Recording:
    """Records each training step's loss (the Trainer rounds the logged one)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append((loss[0] if return_outputs else loss).item())
        return loss


class RecordingDPO(Recording, trl.DPOTrainer):
    losses = None


class RecordingMIO(Recording, MIOTrainer):
    losses = None


def run(trainer_cls, config_cls, tokenizer, tmp_path, data, ref=True, model=None, **kw):
    model = model if model is not None else tiny_model(tokenizer)
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model) if ref else None,
                          args=config_cls(**options(tmp_path, **kw)), train_dataset=data,
                          processing_class=tokenizer)
    trainer.losses = []
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    return trainer, logs


def assert_close(a, b, what, tol=TOL):
    assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"{what}: {a} vs TRL {b}"


def reward_scale(beta, log):
    """beta * |l| of the step's log-probs: what a relative error on TRL's l becomes in beta * (l - l_ref)."""
    return beta * max(abs(log["logps/chosen"]), abs(log["logps/rejected"]))


def compare(ours, theirs):
    (mio, mio_logs), (dpo, dpo_logs) = ours, theirs
    assert len(mio.losses) == len(dpo.losses) and len(mio_logs) == len(dpo_logs) > 0
    for step, (a, b, log) in enumerate(zip(mio.losses, dpo.losses, dpo_logs)):
        if step == 0:  # policy == reference: both losses are f(0), whatever the log-probs' rounding
            assert_close(a, b, "loss at step 0")
        else:
            # f(margin) with |f'| <= 1 (sigmoid, nca_pair), margin = beta * (four log-probs), each of
            # TRL's off by up to TOL relative: the loss inherits that on top of the weights' drift
            slack = 4 * TOL * reward_scale(mio.args.beta, log)
            assert abs(a - b) <= LATER_TOL + slack, f"loss at step {step}: {a} vs TRL {b}"
    for step, (a, b) in enumerate(zip(mio_logs, dpo_logs)):
        for name in COMPARED:
            tol = TOL if step == 0 else LATER_TOL
            if name.startswith("rewards/") and name != "rewards/accuracies":
                # beta * (l - l_ref): TRL's error on l (TOL relative) is not relative to the difference
                assert abs(a[name] - b[name]) <= tol * max(reward_scale(mio.args.beta, b), 1.0), \
                    f"{name} at step {step}"
            else:
                assert_close(a[name], b[name], f"{name} at step {step}", tol)


@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair"])
def test_three_steps_match_trl(tokenizer, tmp_path, loss_type):
    data = rows()
    ours = run(RecordingMIO, MIOConfig, tokenizer, tmp_path / "mio", data, loss_type=loss_type, max_steps=3)
    theirs = run(RecordingDPO, trl.DPOConfig, tokenizer, tmp_path / "dpo", data, loss_type=loss_type, max_steps=3)
    compare(ours, theirs)
    for (name, a), (_, b) in zip(ours[0].model.named_parameters(), theirs[0].model.named_parameters()):
        assert (a - b).norm() <= LATER_TOL * b.norm(), name


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "bco_pair", "sppo_hard", "apo_zero"])
def test_each_loss_matches_trl(tokenizer, tmp_path, loss_type):
    data = rows(n=2)
    extra = dict(label_smoothing=0.1) if loss_type == "robust" else {}
    ours = run(RecordingMIO, MIOConfig, tokenizer, tmp_path / "mio", data, loss_type=loss_type, **extra)
    theirs = run(RecordingDPO, trl.DPOConfig, tokenizer, tmp_path / "dpo", data, loss_type=loss_type, **extra)
    compare(ours, theirs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_matches_trl(tokenizer, tmp_path, loss_type):
    """TRL stores reference sums for every loss (ipo included); the op takes them as they are."""
    data = rows(n=2)
    ours = run(RecordingMIO, MIOConfig, tokenizer, tmp_path / "mio", data, ref=False, loss_type=loss_type,
               precompute_ref_log_probs=True)
    theirs = run(RecordingDPO, trl.DPOConfig, tokenizer, tmp_path / "dpo", data, ref=False, loss_type=loss_type,
                 precompute_ref_log_probs=True)
    compare(ours, theirs)
    assert_close(ours[0].train_dataset["ref_chosen_logps"][0], theirs[0].train_dataset["ref_chosen_logps"][0],
                 "precomputed reference sum")


def test_peft_reference_by_disabled_adapter_matches_trl(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    data = rows(n=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    results = []
    for cls, cfg, name in ((RecordingMIO, MIOConfig, "mio"), (RecordingDPO, trl.DPOConfig, "dpo")):
        model = tiny_model(tokenizer)
        trainer = cls(model=model, args=cfg(**options(tmp_path / name, learning_rate=0.5)), train_dataset=data,
                      processing_class=tokenizer, peft_config=config)
        trainer.losses = []
        trainer.train()
        results.append((trainer, [h for h in trainer.state.log_history if "rewards/chosen" in h]))
    compare(*results)


def test_gradient_checkpointing_matches_trl(tokenizer, tmp_path):
    data = rows(n=2)
    ours = run(RecordingMIO, MIOConfig, tokenizer, tmp_path / "mio", data, gradient_checkpointing=True)
    theirs = run(RecordingDPO, trl.DPOConfig, tokenizer, tmp_path / "dpo", data, gradient_checkpointing=True)
    compare(ours, theirs)


@pytest.mark.parametrize("loss_type", ["mio", "dpo"])
def test_k_negatives_first_step_is_the_op(tokenizer, tmp_path, loss_type):
    """K = 2 rejected per prompt: MIOTrainer's first loss is fused_mio_loss on the same batch."""
    k, data = 2, rows(k=2, n=2)
    model = tiny_model(tokenizer)
    reference = copy.deepcopy(model)
    trainer = RecordingMIO(model=model, ref_model=copy.deepcopy(model),
                           args=MIOConfig(**options(tmp_path, loss_type=loss_type, num_negatives=k)),
                           train_dataset=data, processing_class=tokenizer)
    trainer.losses = []
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 2 * (1 + k)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        ref_hidden = reference.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = model.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    want = fused_mio_loss(hidden[:, :-1], model.lm_head.weight, labels, ref_hidden=ref_hidden[:, :-1],
                          ref_weight=reference.lm_head.weight, loss_type=loss_type, beta=0.5, num_negatives=k)
    trainer.args.per_device_train_batch_size = 2
    trainer.train()
    assert_close(trainer.losses[0], want.loss.item(), "first-step loss")  # one batch = the 2 prompts, any order
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert math.isfinite(logs[0]["rewards/margins"])


def test_k_negatives_precomputed_reference(tokenizer, tmp_path):
    k, data = 3, rows(k=3, n=2)
    trainer = MIOTrainer(model=tiny_model(tokenizer),
                         args=MIOConfig(**options(tmp_path, loss_type="mio", num_negatives=k,
                                                  precompute_ref_log_probs=True)),
                         train_dataset=data, processing_class=tokenizer)
    assert len(trainer.train_dataset["ref_rejected_logps"][0]) == k
    trainer.train()
    first = [h for h in trainer.state.log_history if "rewards/chosen" in h][0]
    assert first["rewards/chosen"] == 0.0  # policy == reference at step 0


@pytest.mark.parametrize("kw", [dict(), dict(precompute_ref_log_probs=True), dict(loss_type="mio", num_negatives=3)],
                         ids=["ref-model", "precomputed", "mio-K3"])
def test_first_step_rewards_exactly_zero(tokenizer, tmp_path, kw):
    """Policy == reference at the first step: rewards exactly 0 and accuracy 0, not rounding noise."""
    model = tiny_model(tokenizer)
    ref = None if kw.get("precompute_ref_log_probs") else copy.deepcopy(model)
    trainer = MIOTrainer(model=model, ref_model=ref,
                         args=MIOConfig(**options(tmp_path, per_device_train_batch_size=4, **kw)),
                         train_dataset=rows(k=kw.get("num_negatives", 1), n=4), processing_class=tokenizer)
    trainer.train()
    first = [h for h in trainer.state.log_history if "rewards/chosen" in h][0]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, (name, first[name])


@pytest.mark.parametrize("option, match", [
    (dict(loss_type=["sigmoid", "ipo"]), "mix"),
    (dict(loss_type="sigmoid", loss_weights=[0.5]), "loss_weights"),
    (dict(loss_type="exo_pair", label_smoothing=1e-3), "loss_type must be one of"),
    (dict(loss_type="aot"), "loss_type must be one of"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(loss_type="sigmoid", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="nca_pair", num_negatives=2), "nca_pair"),
    (dict(num_negatives=0), "num_negatives"),
])
def test_refused_options(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        MIOConfig(**options(tmp_path, **option))


def test_refused_at_trainer_construction(tokenizer, tmp_path):
    """A plain DPOConfig is checked too; a K mismatch with the data is refused before training."""
    with pytest.raises(ValueError, match="ld_alpha"):
        MIOTrainer(model=tiny_model(tokenizer), args=trl.DPOConfig(**options(tmp_path, ld_alpha=0.5)),
                   train_dataset=rows(n=2), processing_class=tokenizer)
    with pytest.raises(ValueError, match="num_negatives=2"):
        MIOTrainer(model=tiny_model(tokenizer), ref_model=tiny_model(tokenizer),
                   args=MIOConfig(**options(tmp_path, loss_type="mio", num_negatives=2)),
                   train_dataset=rows(k=3, n=2), processing_class=tokenizer)
    model = tiny_model(tokenizer)
    model.config.output_multiplier_scale = 2.0
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        MIOTrainer(model=model, args=MIOConfig(**options(tmp_path)), train_dataset=rows(n=2),
                   processing_class=tokenizer)


def test_in_memory_model_without_reference_says_what_to_pass(tokenizer, tmp_path):
    """TRL would load the reference from the policy's path, '' for a model built in memory."""
    with pytest.raises(ValueError, match=r"pass ref_model= .* or precompute_ref_log_probs=True"):
        MIOTrainer(model=tiny_model(tokenizer), args=MIOConfig(**options(tmp_path)), train_dataset=rows(n=2),
                   processing_class=tokenizer)


def test_no_checkpointing_deprecation_warnings_and_bars_once(tokenizer, tmp_path, capfd):
    """MIOConfig's defaults (TRL's gradient_checkpointing=True) and a K = 3 run warn nothing about
    gradient_checkpointing, and TRL's dataset-preparation bars show once, not K times."""
    import warnings

    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.enable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = MIOConfig(output_dir=str(tmp_path), loss_type="mio", num_negatives=3, max_steps=1,
                               per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True,
                               save_strategy="no")
            model = tiny_model(tokenizer)
            MIOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=rows(k=3, n=2),
                       processing_class=tokenizer).train()
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()
    assert config.activation_checkpointing is True  # TRL's default, carried to the current name
    deprecated = [str(w.message) for w in caught if "gradient_checkpointing" in str(w.message)]
    assert deprecated == []
    err = capfd.readouterr().err
    assert err.count("Tokenizing train dataset: 100%") == 1, err


def tiny_gemma2(tokenizer):
    """A soft-capped head: the fused loss scores it with the model's own transform."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits large enough for the cap to matter
        model.lm_head.weight.mul_(20.0)
    return model


def forward_logps(model, tokenizer, prompt, response):
    """log pi(response | prompt) from the model's own forward().logits (softcap included)."""
    p = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([p + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(p) - 1:].sum().item()


def test_softcapped_head_matches_the_model_and_trl(tokenizer, tmp_path):
    """Gemma-2's soft-capped head: our log-probs are the model's own forward's, our loss is TRL's.
    (TRL 1.16's own logps/* differ from the model's forward here by ~7e-4 relative, equally for
    policy and reference at step 0, so its loss agrees; ours are compared with the forward.)"""
    data = rows(n=2)
    ours = run(RecordingMIO, MIOConfig, tokenizer, tmp_path / "mio", data, model=tiny_gemma2(tokenizer))
    theirs = run(RecordingDPO, trl.DPOConfig, tokenizer, tmp_path / "dpo", data, model=tiny_gemma2(tokenizer))
    assert ours[0].head_options == dict(logit_scale=1.0, final_logit_softcapping=2.0)
    assert_close(ours[0].losses[0], theirs[0].losses[0], "loss")
    model = tiny_gemma2(tokenizer).eval()  # the step-0 weights the metrics were taken with
    for name, field in (("logps/chosen", "chosen"), ("logps/rejected", "rejected")):
        want = sum(forward_logps(model, tokenizer, r["prompt"], r[field]) for r in data) / len(data)
        assert_close(ours[1][0][name], want, name)
    assert "logits/chosen" not in ours[1][0]
