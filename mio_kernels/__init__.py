"""mio-kernels: memory-efficient fused LM-head preference losses (MIO / DPO and relatives).

Layers: kernels (mio_kernels.kernels, csrc/ via mio_kernels.backends) -> sequence reduction
(mio_kernels.sequence) -> losses (mio_kernels.losses, mio_kernels.objective) -> trainer
(mio_kernels.train).
"""
from mio_kernels.function import FusedMIOLoss, MIOLossOutput, fused_mio_loss, linear_logprobs
from mio_kernels.grpo import FusedGRPOLoss, GRPOLossOutput, fused_grpo_loss
from mio_kernels.losses import LOSSES, get_loss, register_loss

__version__ = "0.1.0"
__all__ = ["fused_mio_loss", "FusedMIOLoss", "MIOLossOutput", "linear_logprobs", "LOSSES", "get_loss",
           "register_loss", "fused_grpo_loss", "FusedGRPOLoss", "GRPOLossOutput"]
