"""`python -m giants ...` (what torchrun runs: `torchrun --nproc-per-node N -m giants train ...`)."""

import sys

from giants.cli import main

sys.exit(main())
