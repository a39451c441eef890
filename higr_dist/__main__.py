"""``python -m higr_dist <command> ...``: the ``higr`` console script (``higr_dist.cli``)."""

from higr_dist.cli import main

raise SystemExit(main())
