"""Training metrics out: TensorBoard event files, one console line, a tqdm bar (rank 0 only).

Design
------
The trainer hands :class:`RunLogger` one flat ``{key: value}`` dict per log point (means over
the last ``log_every`` steps, already reduced over ranks). The keys are the trainer's own
(``loss/<term>`` for every metric a stage reports, via :func:`metric_tag`; ``opt/*``,
``perf/*``, ``mem/*``, ``val/*``) and are what ``summary.json`` stores. On the way into
TensorBoard :func:`tb_tag` files each key under the group an operator looks for, and the
groups are named so that TensorBoard's alphabetical order puts the run's health first:

==============  ==================================================================  =======
group           tags                                                                stages
==============  ==================================================================  =======
``health/``     ``samples_per_s``, ``tokens_per_s``, ``step_time_s``,               all
                ``data_wait_share``, ``mfu``, ``host_rss_gb``,
                ``device_max_alloc_gb`` (GPU only)
``loss/``       ``total`` and the terms that make up the objective                  all
``opt/``        ``lr``, ``grad_norm``                                               all
``pref/``       ``margin*``, ``pair_acc*``, ``chosen_logp``, ``rejected_logp``      orpo, dpo
``sid/``        ``perplexity_l*``, ``dead_codes_l*``, ``pair_same_l1``              tokenizer
``train/``      ``acc``, ``acc_l*`` (teacher-forced accuracy on training batches)   hsd, flat, sasrec
``val/``        ``ndcg5``, ``recall5``, ``best_ndcg5``, ``seconds``                 validated stages
==============  ==================================================================  =======

``docs/OPERATIONS.md`` lists every tag with its unit and a healthy value. Event files are
written with ``torch.utils.tensorboard.SummaryWriter`` into ``<out_dir>/tb/``; the report's
plots read them back (``higr_dist.eval.report``). On other ranks the logger is inert. The
console line goes through ``tqdm.write`` so it does not tear the progress bar.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from tqdm import tqdm

from higr_dist.layout import StageLayout

#: order and short names of the console line (tags not listed are TensorBoard-only)
_CONSOLE = (
    ("loss/total", "loss", "{:.4f}"),
    ("opt/lr", "lr", "{:.2e}"),
    ("opt/grad_norm", "gnorm", "{:.3f}"),
    ("perf/samples_per_s", "samples/s", "{:.0f}"),
    ("perf/tokens_per_s", "tok/s", "{:.0f}"),
    ("perf/step_time_s", "step", "{:.3f}s"),
    ("perf/data_wait_share", "wait", "{:.1%}"),
    ("perf/mfu", "mfu", "{:.2%}"),
    ("mem/rss_gb", "rss", "{:.2f}GB"),
    ("mem/device_max_alloc_gb", "dev", "{:.2f}GB"),
)


def metric_tag(name: str) -> str:
    """Stage metric name -> the trainer's key (``rec`` -> ``loss/rec``; names with '/' verbatim).

    The key is what ``summary.json`` stores; :func:`tb_tag` gives its TensorBoard tag."""
    return name if "/" in name else f"loss/{name}"


#: TensorBoard groups of the metrics a stage reports that are not loss terms (first match wins)
_TERM_GROUPS = (
    ("sid", re.compile(r"(perplexity|dead_codes|pair_same)(_l\d+)?")),
    ("pref", re.compile(r"(margin|pair_acc)(_\w+)?|chosen_logp|rejected_logp")),
    ("train", re.compile(r"acc(_l\d+)?")),
)

#: the trainer's fixed keys whose TensorBoard tag is not the key itself
_FIXED = {
    "perf/samples_per_s": "health/samples_per_s",
    "perf/tokens_per_s": "health/tokens_per_s",
    "perf/step_time_s": "health/step_time_s",
    "perf/data_wait_share": "health/data_wait_share",
    "perf/mfu": "health/mfu",
    "mem/rss_gb": "health/host_rss_gb",
    "mem/device_max_alloc_gb": "health/device_max_alloc_gb",
    "perf/validation_s": "val/seconds",
}


def tb_tag(key: str) -> str:
    """The trainer's key -> its TensorBoard tag (see the module docstring's table).

    ``perf/mfu`` -> ``health/mfu``, ``loss/acc_l2`` -> ``train/acc_l2``, ``loss/margin_o3`` ->
    ``pref/margin_o3``, ``loss/dead_codes_l1`` -> ``sid/dead_codes_l1``, ``loss/ce`` stays."""
    if key in _FIXED:
        return _FIXED[key]
    group, _, name = key.partition("/")
    if group == "perf" or group == "mem":
        return f"health/{name}"
    if group == "loss":
        for target, pattern in _TERM_GROUPS:
            if pattern.fullmatch(name):
                return f"{target}/{name}"
    return key


def is_loss_term(key: str) -> bool:
    """Whether a trainer key is a term of the objective (TensorBoard group ``loss/``)."""
    return tb_tag(key).startswith("loss/")


def format_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """The console line for one log point (the objective's terms after the fixed fields)."""
    parts = [f"step {step}/{total}" if total >= step else f"step {step}"]
    for tag, short, fmt in _CONSOLE:
        v = scalars.get(tag)
        if v is not None and math.isfinite(v):
            parts.append(f"{short} {fmt.format(v)}")
    for key in sorted(scalars):
        if key != "loss/total" and is_loss_term(key):
            parts.append(f"{key[5:]} {scalars[key]:.4f}")
    return " | ".join(parts)


class RunLogger:
    """TensorBoard writer + console line + progress bar; no-ops unless ``enabled`` (rank 0)."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(StageLayout(Path(out_dir)).tensorboard))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar by ``steps`` optimizer steps."""
        if self.bar is not None:
            if self.bar.n + steps > self.bar.total:  # epoch-based totals are estimates
                self.bar.total = self.bar.n + steps
            self.bar.update(steps)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Write every finite scalar at ``step`` to TensorBoard under its :func:`tb_tag`
        (no console line)."""
        if not self.enabled:
            return
        for key, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tb_tag(key), value, global_step=step)
        self.writer.flush()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write every finite scalar at ``step`` and print the console line."""
        if not self.enabled:
            return
        self.write(step, scalars)
        line = format_line(step, self.total, scalars)
        if self.bar is not None:
            if "loss/total" in scalars:
                self.bar.set_postfix_str(f"loss {scalars['loss/total']:.4f}", refresh=False)
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        """A plain line on rank 0 (run start, resume, export ...)."""
        if not self.enabled:
            return
        if self.bar is not None:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
