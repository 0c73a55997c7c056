"""Integrations with training libraries; each is an optional dependency, imported on use:

    from mio_kernels.integrations.trl import MIOConfig, MIOTrainer   # pip install -e ".[trl]" (from the checkout)
"""
