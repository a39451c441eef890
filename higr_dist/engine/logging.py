"""Training metrics out: TensorBoard event files, one console line, a tqdm bar (rank 0 only).

Design
------
The trainer hands :class:`RunLogger` one flat ``{tag: value}`` dict per log point (means over
the last ``log_every`` steps, already reduced over ranks). Tags follow one scheme that the
report's plots rely on:

- ``loss/total`` and ``loss/<term>`` for each term a stage reports without a ``/`` in its name
  (a stage that reports ``codebook/perplexity_1`` gets that tag verbatim);
- ``opt/lr``, ``opt/grad_norm``;
- ``perf/samples_per_s``, ``perf/tokens_per_s``, ``perf/step_time_s``, ``perf/data_wait_share``,
  ``perf/mfu``;
- ``mem/rss_gb`` (host), ``mem/device_max_alloc_gb`` (GPU only).

Event files are written with ``torch.utils.tensorboard.SummaryWriter`` into ``<out_dir>/tb/``.
On other ranks the logger is inert. The console line goes through ``tqdm.write`` so it does not
tear the progress bar.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tqdm import tqdm

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
    """Stage metric name -> TensorBoard tag (``rec`` -> ``loss/rec``; names with '/' verbatim)."""
    return name if "/" in name else f"loss/{name}"


def format_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """The console line for one log point (loss terms after the fixed fields)."""
    parts = [f"step {step}/{total}" if total >= step else f"step {step}"]
    for tag, short, fmt in _CONSOLE:
        v = scalars.get(tag)
        if v is not None and math.isfinite(v):
            parts.append(f"{short} {fmt.format(v)}")
    for tag in sorted(scalars):
        if tag.startswith("loss/") and tag != "loss/total":
            parts.append(f"{tag[5:]} {scalars[tag]:.4f}")
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

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
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
        """Write every finite scalar at ``step`` to TensorBoard (no console line)."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=step)
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
