import sys

from mio_kernels.train.cli import main

sys.exit(main())
