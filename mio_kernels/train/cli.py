"""`mio-train` / `python -m mio_kernels.train`: parse TrainConfig, run the job, print the summary."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from mio_kernels.train.config import parse_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    from mio_kernels.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        if trainer.d.is_main:
            print(json.dumps(summary, indent=1))
    finally:
        trainer.close()
    return 0
