"""MIO with K rejected responses per prompt, from TRL: MIOTrainer is a trl.DPOTrainer whose loss is
the fused op (logits never whole). Runs on CPU in well under a minute with a tiny local model.

    python python/examples/trl_mio.py [--steps 4] [--negatives 3] [--loss-type mio]

Your own model and data work the same way: any HF causal LM, and a dataset with "prompt",
"chosen" and "rejected" (a list of K responses for K > 1; a string for TRL's usual K = 1).
"""
import argparse
import copy
import json
import tempfile

import torch
from datasets import Dataset

from mio_kernels.data import ARITHMETIC_TRAIN
from mio_kernels.integrations.trl import MIOConfig, MIOTrainer
from mio_kernels.train.model import build_tiny_llama, builtin_tokenizer


def load_rows(n: int, k: int) -> Dataset:
    with open(ARITHMETIC_TRAIN) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                               "rejected": r["rejected"][:k] if k > 1 else r["rejected"][0]} for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--loss-type", default="mio")
    args = parser.parse_args(argv)

    tokenizer = builtin_tokenizer()          # a word-level tokenizer built from the data (no download)
    torch.manual_seed(0)
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    config = MIOConfig(
        output_dir=tempfile.mkdtemp(), loss_type=args.loss_type, num_negatives=args.negatives, beta=0.1,
        max_steps=args.steps, per_device_train_batch_size=4, learning_rate=5e-4, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = MIOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                         train_dataset=load_rows(16, args.negatives), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    for step, h in enumerate(logs):
        print(f"step {step}  loss {h['loss']:.4f}  margins {h['rewards/margins']:+.4f}  "
              f"accuracy {h['rewards/accuracies']:.2f}")
    return logs


if __name__ == "__main__":
    main()
