"""GRPO from TRL on the fused op: MIOGRPOTrainer is a trl.GRPOTrainer whose per-token log-probs,
entropies and loss come from fused_grpo_loss (logits never whole). Runs on CPU in about a minute
with a tiny local model and a local reward; no hub access.

    python python/examples/trl_grpo.py [--steps 4] [--loss-type dapo] [--beta 0.04]

Your own model, data and rewards work the same way: the one change from TRL is the class names
(trl.GRPOTrainer -> MIOGRPOTrainer, trl.GRPOConfig -> MIOGRPOConfig).
"""
import argparse
import json
import re
import tempfile

from datasets import Dataset

from mio_kernels.data import ARITHMETIC_TRAIN
from mio_kernels.integrations.trl import MIOGRPOConfig, MIOGRPOTrainer
from mio_kernels.train.model import build_tiny_llama, builtin_tokenizer


def load_prompts(n: int) -> Dataset:
    with open(ARITHMETIC_TRAIN) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return Dataset.from_list([{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows])


def correct_answer(completions, answer, **kwargs):
    """1 when the completion's first number is the answer's, plus a small reward for being short."""
    def first_number(text):
        m = re.search(r"-?\d+", text)
        return m.group(0) if m else None
    return [float(first_number(c) is not None and first_number(c) == first_number(a)) + 0.1 / (1 + len(c.split()))
            for c, a in zip(completions, answer)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--loss-type", default="dapo", help="grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo")
    parser.add_argument("--importance-sampling-level", default="token", help="token, or sequence (GSPO)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 loads a reference model)")
    args = parser.parse_args(argv)

    import torch
    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    out = tempfile.mkdtemp()
    if args.beta > 0:  # TRL builds the reference from the policy's path: save the in-memory model first
        model.save_pretrained(f"{out}/init")
        model.config._name_or_path = f"{out}/init"
    config = MIOGRPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
                           max_completion_length=16, learning_rate=1e-3, loss_type=args.loss_type,
                           importance_sampling_level=args.importance_sampling_level, beta=args.beta,
                           logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                           disable_tqdm=True)
    trainer = MIOGRPOTrainer(model=model, reward_funcs=correct_answer, args=config,
                             train_dataset=load_prompts(32), processing_class=tokenizer)
    trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"step {log['step']}: loss {log['loss']:.4f}  reward {log['reward']:.3f}  "
                  f"entropy {log['entropy']:.3f}")
    trainer.save_model(f"{out}/final")
    print(f"saved to {out}/final")


if __name__ == "__main__":
    main()
