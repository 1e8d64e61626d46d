"""Run a Megatron-LM training script with the DeepEP dispatcher registered, unchanged::

    torchrun --nproc-per-node 8 -m deepep_megatron.megatron.run pretrain_gpt.py \\
        --moe-token-dispatcher-type deepep --moe-router-dtype fp32 [--no-deepep-fp8-dispatch] ...

:func:`~deepep_megatron.megatron.install` is called before the script runs, so its argument
parser accepts ``deepep`` and the ``--deepep-*`` flags. With ``--moe-token-dispatcher-type flex``
(deepep backend) and no DeepEP installed, megatron's own flex dispatcher is pointed at our Buffer
(:func:`~deepep_megatron.megatron.flex.use_for_flex_dispatcher`).
"""

from __future__ import annotations

import importlib.util
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m deepep_megatron.megatron.run SCRIPT.py [script arguments...]")
    from deepep_megatron.megatron import install

    install(arguments=True)
    from deepep_megatron.megatron.flex import flex_deepep_requested, use_for_flex_dispatcher

    if flex_deepep_requested(sys.argv[2:]) and importlib.util.find_spec("deep_ep") is None:
        use_for_flex_dispatcher()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
