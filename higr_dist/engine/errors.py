"""Why a training run stopped, in one line: the errors the engine raises on purpose.

Design
------
A run that cannot go on for a reason the user can act on (a stage with no sample, a rank
without data, a non-finite loss, a checkpoint the disk could not hold, a run folder the ranks
do not share) raises a :class:`RunStopped` whose message is one line saying what happened,
where (step, rank, path) and what to do. The engine raises it on every rank at the same point
(the decision is all-reduced first), so no rank is left waiting in a collective. Launchers
(``launcher/train.py``, ``higr run``) print the message instead of a traceback and exit with
the error's ``exit_code``: 2 for :class:`BadInput` (the data, the paths or the set-up: the
user's to fix, as for a config error), 1 for the rest (the run itself failed; its last
complete checkpoint is intact). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunStopped(RuntimeError):
    """The run stopped for the reason its one-line message gives; raised on every rank."""

    exit_code = 1


class BadInput(RunStopped):
    """The data, paths or cluster set-up cannot train (e.g. an epoch with no sample)."""

    exit_code = 2


class NonFiniteLoss(RunStopped):
    """A loss became NaN or infinite; nothing was saved after the last finite step."""


class CheckpointFailed(RunStopped):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


class ExportMismatch(RunStopped):
    """``final/model_fp32.pt``, reloaded, does not reproduce the live model's outputs."""


def one_line(exc: BaseException) -> str:
    """An error as one line: a config's problems joined, else the message's first line."""
    problems = getattr(exc, "problems", None)
    if problems:
        return "invalid config: " + "; ".join(problems)
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
