"""Per-step time and peak memory of TRL's own GRPOTrainer loss step vs MIOGRPOTrainer's, on the same
CPU and the same batch (a synthetic generated batch: B completions of C tokens over a V-token
vocabulary; the loss forward and backward only, generation excluded).

    python python/examples/trl_grpo_compare.py [--vocab 32000 --hidden 256 --batch 8 --prompt 32 --completion 256]

Each trainer runs in its own process (peak memory = the process's peak resident set during the
steps minus its resident set before them); the time is the median of --steps steps after one warm-up.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def measure(kind, a):
    import datasets
    import psutil
    import torch
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM

    from mio_kernels.integrations.trl import MIOGRPOConfig, MIOGRPOTrainer
    from mio_kernels.train.model import builtin_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tok = builtin_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    cls, cfg = (trl.GRPOTrainer, trl.GRPOConfig) if kind == "trl" else (MIOGRPOTrainer, MIOGRPOConfig)
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                  args=cfg(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, num_generations=a.batch,
                           max_completion_length=a.completion, use_cpu=True, bf16=False, report_to=[],
                           activation_checkpointing=False, loss_type="dapo", beta=0.0),
                  train_dataset=datasets.Dataset.from_list([{"prompt": "1 + 1"}] * a.batch), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(0)
    b, p, c = a.batch, a.prompt, a.completion
    inputs = {"prompt_ids": torch.randint(4, a.vocab, (b, p), generator=g), "prompt_mask": torch.ones(b, p, dtype=torch.long),
              "completion_ids": torch.randint(4, a.vocab, (b, c), generator=g),
              "completion_mask": torch.ones(b, c, dtype=torch.long), "advantages": torch.randn(b, generator=g),
              "num_items_in_batch": torch.tensor(float(b * c))}
    model.train()
    times, losses = [], []
    rss_before = psutil.Process().memory_info().rss
    for _ in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "step_s": statistics.median(times[1:]), "peak_mib": (peak - rss_before) / 2 ** 20,
            "loss": losses[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["trl", "mio"])
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(a.worker, a)))
        return
    for kind in ("trl", "mio"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", kind], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{'TRL GRPOTrainer' if kind == 'trl' else 'MIOGRPOTrainer'}: {r['step_s'] * 1e3:.0f} ms/step, "
              f"peak +{r['peak_mib']:.0f} MiB, loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
