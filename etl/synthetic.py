"""spark-submit entry point of the synthetic log generator (thin): see ``higr_dist.etl.synthetic``.

    spark-submit etl/synthetic.py --users U --items I --interactions-per-user M --seed S \
        --output DIR [--config F] [key=value ...]

Also runnable as plain python (starts ``local[*]``, or ``--master``).
"""

import sys
from pathlib import Path

# run from a checkout without `pip install -e .`: make the package importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higr_dist.etl.synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
