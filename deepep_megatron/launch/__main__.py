"""`python -m deepep_megatron.launch`: see `deepep_megatron.launch.cli`."""

import sys

from deepep_megatron.launch.cli import main

sys.exit(main())
