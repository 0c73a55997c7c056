"""Minimal FSDP2 preference trainer: any HF causal LM + fused_mio_loss (the logits are never formed).

    mio-train                       # the embedded default job (tiny Llama, arithmetic preferences)
    python -m mio_kernels.train --help
    torchrun --nproc_per_node 2 -m mio_kernels.train --config my.yaml

Layout (torchtitan-like): config.py (TrainConfig + CLI), data.py, model.py (the model and what its
LM head computes), parallelize.py, state.py (TrainState: what a checkpoint holds), checkpoint.py,
reference.py (reference log-probs), trainer.py (the loop), evaluate.py, metrics.py, cli.py.
"""
