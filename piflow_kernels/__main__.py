"""``python -m piflow_kernels`` runs :func:`piflow_kernels.cli.main`."""

import sys

from piflow_kernels.cli import main

sys.exit(main())
