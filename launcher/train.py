"""The file ``deepspeed`` / ``torchrun`` start on every rank, for launchers that take a script
path: the same entry point as ``-m higr_dist.launch`` (its docstring has the launch commands)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launcher/train.py --config tiny/hsd
    deepspeed --hostfile hostfile launcher/train.py --config cluster/hsd

From a checkout it works without an install (the checkout is put on the path).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higr_dist.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
