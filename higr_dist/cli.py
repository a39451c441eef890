"""Console entry points (declared in pyproject.toml).

- ``higr run [--config F] [--name NAME] [--interactions P --items P] [key=value ...]``: the pipeline
- ``higr-eval --run-dir runs/<name>``: evaluation + report of a finished run
- ``higr-generate --run-dir runs/<name> [--num-users N] [--out F]``: slates for test users
- ``higr-preflight --config F [--hostfile H] [key=value ...]``: validate before launching
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from higr_dist.pipeline import main as run_main

        return run_main(rest)
    if cmd == "eval":
        return eval_main(rest)
    if cmd == "generate":
        return generate_main(rest)
    if cmd == "preflight":
        return preflight_main(rest)
    print(f"higr: unknown command {cmd!r} (run, eval, generate, preflight)", file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None) -> int:
    from higr_dist.eval.harness import eval_main as _main

    return _main(argv)


def generate_main(argv: list[str] | None = None) -> int:
    from higr_dist.eval.harness import generate_main as _main

    return _main(argv)


def preflight_main(argv: list[str] | None = None) -> int:
    from higr_dist.engine.preflight import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
