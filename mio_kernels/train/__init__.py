"""Minimal FSDP2 preference trainer: any HF causal LM + fused_mio_loss (the logits are never formed).

    mio-train                       # the embedded default job (tiny Llama, arithmetic preferences)
    python -m mio_kernels.train --help
    torchrun --nproc_per_node 2 -m mio_kernels.train --config my.yaml

Layout (torchtitan-like): config.py (TrainConfig + CLI), data.py, model.py, parallelize.py,
checkpoint.py, trainer.py (the loop), evaluate.py, cli.py.
"""
