"""`python -m deepep_megatron.bench`: see `deepep_megatron.bench.cli`."""

import sys

from deepep_megatron.bench.cli import main

sys.exit(main())
