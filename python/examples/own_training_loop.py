"""fused_mio_loss in your own training loop: a tiny HF Llama, a few MIO steps on random pairs.

    python python/examples/own_training_loop.py [--steps 5] [--loss-type mio]

The model's backbone gives the final hidden states; the LM head's weight goes to the loss, so the
[S, T, V] logits are never built. Reference log-probs are precomputed once, forward-only.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mio_kernels import fused_mio_loss, linear_logprobs
from mio_kernels.losses import DEFAULT_LOSS, LOSSES


def random_preference_batch(pairs: int, prompt_len: int, response_len: int, vocab: int, generator):
    """[chosen (P rows); rejected (P rows)] sharing each prompt; labels mask the prompt with -100."""
    prompts = torch.randint(3, vocab, (pairs, prompt_len), generator=generator)
    responses = torch.randint(3, vocab, (2 * pairs, response_len), generator=generator)
    input_ids = torch.cat([prompts.repeat(2, 1), responses], dim=1)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    # Causal shift: position t predicts token t+1.
    return input_ids[:, :-1], labels[:, 1:]


def sequence_logps(model, input_ids, labels):
    hidden = model.model(input_ids=input_ids).last_hidden_state          # [S, T, H]
    return hidden, linear_logprobs(hidden, model.lm_head.weight, labels).sum(-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-type", default=DEFAULT_LOSS, choices=LOSSES)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    input_ids, labels = random_preference_batch(4, 12, 20, config.vocab_size, generator)

    with torch.no_grad():  # reference = the initial policy, scored once, forward-only
        _, ref_logps = sequence_logps(model, input_ids, labels)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        out = fused_mio_loss(hidden, model.lm_head.weight, labels, ref_logps=ref_logps,
                             loss_type=args.loss_type, beta=0.1)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        m = {k: v.item() for k, v in out.metrics.items()}
        print(f"step {step}  loss {out.loss.item():.4f}  chosen {m['rewards/chosen']:+.4f}  "
              f"rejected {m['rewards/rejected']:+.4f}  accuracy {m['rewards/accuracies']:.2f}")
    return out


if __name__ == "__main__":
    main()
