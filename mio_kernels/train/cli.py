"""`mio-train` / `python -m mio_kernels.train`: parse TrainConfig, run the job, end with a few lines
for a person (what was trained, the headline numbers, where the files are; summary.json has them all).

A user error (an invalid option, a missing path, a malformed dataset row, a run directory that
must not be used) is one line on stderr and exit status 2, found before any training; a run that
stops on non-finite values is one line and exit status 1. --debug shows the traceback instead.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from mio_kernels.train.config import parse_args

USER_ERRORS = (ValueError, TypeError, OSError)


def _error(err: BaseException) -> str:
    return "mio-train: error: " + " ".join(str(err).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cfg = parse_args(argv)
        from mio_kernels.train.trainer import Trainer

        trainer = Trainer(cfg)  # validation, run directory, model and data: all before any training
    except USER_ERRORS as err:
        if debug:
            raise
        print(_error(err), file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
        if trainer.d.is_main:  # the numbers in full: summary.json
            print("\n".join(trainer.closing_lines(summary)), flush=True)
    except FloatingPointError as err:
        if debug:
            raise
        print(_error(err), file=sys.stderr)
        return 1
    finally:
        trainer.close()
    return 0
