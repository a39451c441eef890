"""Run reports: ``report.json`` for scripts, ``report.md`` + PNG plots for people.

The JSON layout is a contract (scripts read it; see README and issue #4):
``etl.{rows_in,rows_out,rows_quarantined}``, ``tokenizer.{collision,concentration,consistency}``,
``eval.<model>.{impressions.{hit5,recall5}, effective.{hit5,recall5,ndcg5}, ild}``,
``decode.{higr,flat}.{median_ms,p99_ms,slates_per_s}``, ``decode.speedup``, ``tensorboard``.

Plots read the TensorBoard event files the trainer wrote (the single source of truth for curves),
so a report can be rebuilt for any finished run without re-training:
``python -m higr_dist.eval.report --run-dir runs/demo``. One panel per quantity, each with its
unit: ``training_health.png`` (samples/s, MFU, data-wait share, memory; a line per stage),
``loss.png`` (each stage's objective terms), ``diagnostics.png`` (validation NDCG@5,
accuracies, codebook health, preference pairs), ``models.png`` (every model's NDCG@5 and ILD
with 95% intervals), ``quality_latency.png`` (NDCG@5 against decoding latency over beam widths,
from ``beam_sweep.json`` when ``bench/beam_sweep.py`` wrote one into the run folder, else the
run's own beam) and ``decode_latency.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from higr_dist.layout import RunLayout

MODEL_ORDER = ("higr", "higr_no_align", "flat", "sasrec", "popularity")


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def eval_table(evals: dict[str, dict]) -> str:
    """Markdown table of the evaluation metrics, one row per model."""
    head = ("| model | imp. hit@5 | imp. recall@5 | eff. hit@5 | eff. recall@5 | NDCG@5 | ILD |\n"
            "|---|---|---|---|---|---|---|")
    rows = []
    names = [m for m in MODEL_ORDER if m in evals] + [m for m in evals if m not in MODEL_ORDER]
    for name in names:
        r = evals[name]
        rows.append("| " + " | ".join([name, _fmt(r["impressions"]["hit5"]),
                                       _fmt(r["impressions"]["recall5"]),
                                       _fmt(r["effective"]["hit5"]),
                                       _fmt(r["effective"]["recall5"]),
                                       _fmt(r["effective"]["ndcg5"]), _fmt(r["ild"])]) + " |")
    return "\n".join([head, *rows])


def comparison_lines(evals: dict[str, dict]) -> list[str]:
    """HiGR minus each other model's NDCG@5, paired bootstrap 95% interval, one line each."""
    lines = []
    for name in [m for m in MODEL_ORDER if m in evals and m != "higr"]:
        c = evals[name].get("higr_minus_ndcg5")
        if c:
            verdict = ("HiGR ahead" if c["ci95"][0] > 0 else
                       "HiGR behind" if c["ci95"][1] < 0 else "within noise")
            lines.append(f"- HiGR minus {name}: {c['diff']:+.4f} [{c['ci95'][0]:+.4f}, "
                         f"{c['ci95'][1]:+.4f}] over {c['users']:,} users ({verdict})")
    return lines


def selection_lines(selection: dict[str, dict]) -> list[str]:
    """What validation chose for each model (and whether alignment was kept)."""
    lines = []
    for stage, s in selection.items():
        best = s.get("best")
        if not best:
            continue
        line = (f"- {stage}: best validation NDCG@5 {best['ndcg5']:.4f} at step {best['step']} "
                f"of {s['final_step']}; kept the {s['kept']} weights"
                f"{' (stopped early)' if s.get('stopped_early') else ''}")
        if stage in ("orpo", "dpo") and best["step"] == 0 and s["kept"] == "best":
            line += (f"; {stage} did not improve validation NDCG@5 over the pretrained HSD, so "
                     "the pretrained weights are served as HiGR")
        lines.append(line)
    return lines


def decode_table(decode: dict) -> str:
    """Markdown table of the decoders' latency at the report's batch size."""
    head = "| decoder | batch | median ms | p99 ms | slates/s |\n|---|---|---|---|---|"
    rows = []
    for name in ("higr", "flat"):
        d = decode.get(name)
        if d:
            rows.append(f"| {name} | {d.get('batch', '')} | {d['median_ms']:.2f} | {d['p99_ms']:.2f} "
                        f"| {d['slates_per_s']:.1f} |")
    if "speedup" in decode:
        rows.append(f"\nHiGR coarse-to-fine vs flat beam search: **{decode['speedup']:.2f}x** "
                    "(ratio of median latencies).")
    return "\n".join([head, *rows])


#: the training-health panels: TensorBoard tag, panel title, y label, scale applied to values
HEALTH_PANELS = (
    ("health/samples_per_s", "throughput", "samples/s", 1.0),
    ("health/mfu", "model FLOPs utilisation", "MFU (% of peak)", 100.0),
    ("health/data_wait_share", "data wait", "% of step time waiting for data", 100.0),
    ("health/host_rss_gb", "host memory", "rank 0 RSS (GB)", 1.0),
    ("health/device_max_alloc_gb", "device memory", "peak allocated (GB)", 1.0),
)

#: the diagnostics panels: tag pattern, panel title, y label
DIAGNOSTIC_PANELS = (
    (r"val/ndcg5", "validation NDCG@5 (model selection)", "NDCG@5"),
    (r"train/acc(_l\d+)?", "next-code accuracy (training batches)", "accuracy"),
    (r"sid/perplexity_l\d+", "codebook perplexity per layer", "perplexity (codes)"),
    (r"sid/dead_codes_l\d+", "dead codes per layer", "codes"),
    (r"pref/pair_acc(_\w+)?", "preference pair accuracy", "share of pairs ranked right"),
    (r"pref/margin(_\w+)?", "preference margin", "log-odds margin"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_series(tb_dirs: dict[str, Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every stage's scalars under today's TensorBoard tags (event files written under the
    trainer's own keys, ``perf/mfu`` or ``loss/acc``, are read under ``health/mfu``,
    ``train/acc``: ``higr_dist.engine.logging.tb_tag``)."""
    from higr_dist.engine.logging import tb_tag

    out = {}
    for stage, d in tb_dirs.items():
        if Path(d).is_dir():
            series = read_scalars(d)
            out[stage] = {tb_tag(tag): pts for tag, pts in series.items() if pts}
    return out


def _grid(plt, n: int, cols: int, w: float = 4.6, h: float = 3.3):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_health(series: dict[str, dict], out_dir: Path) -> Path | None:
    """One panel per quantity (throughput, MFU, data wait, memory), one line per stage."""
    panels = [p for p in HEALTH_PANELS if any(p[0] in s for s in series.values())]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), cols=2)
    for ax, (tag, title, ylabel, scale) in zip(axes, panels):
        for stage, tags in series.items():
            if tag in tags:
                xs, ys = zip(*tags[tag])
                ax.plot(xs, [y * scale for y in ys], label=stage)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir / "training_health.png")


def plot_losses(series: dict[str, dict], out_dir: Path) -> Path | None:
    """One panel per stage with the terms of its objective (TensorBoard group ``loss/``)."""
    stages = [s for s, tags in series.items() if any(t.startswith("loss/") for t in tags)]
    if not stages:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(stages), cols=3)
    for ax, stage in zip(axes, stages):
        values = []
        for tag, pts in sorted(series[stage].items()):
            if tag.startswith("loss/"):
                xs, ys = zip(*pts)
                values += ys
                ax.plot(xs, ys, label=tag.split("/", 1)[1], lw=2.2 if tag == "loss/total" else 1.1)
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{stage}: objective terms")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per sample)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / "loss.png")


def plot_diagnostics(series: dict[str, dict], out_dir: Path) -> Path | None:
    """One panel per diagnostic quantity (validation NDCG@5, accuracies, codebook health,
    preference pairs); a line per stage and tag."""
    import re

    panels = []
    for pattern, title, ylabel in DIAGNOSTIC_PANELS:
        rx = re.compile(pattern)
        lines = [(stage, tag, pts) for stage, tags in series.items()
                 for tag, pts in sorted(tags.items()) if rx.fullmatch(tag)]
        if lines:
            panels.append((title, ylabel, lines))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), cols=3)
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for stage, tag, pts in lines:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=f"{stage} {tag.split('/', 1)[1]}", marker="o" if
                    tag.startswith("val/") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, out_dir / "diagnostics.png")


def _ordered(evals: dict[str, dict]) -> list[str]:
    return [m for m in MODEL_ORDER if m in evals] + [m for m in evals if m not in MODEL_ORDER]


def plot_models(evals: dict[str, dict], out_dir: Path) -> Path | None:
    """Bars of every model's NDCG@5 and ILD with their 95% intervals (``ci95`` of the eval
    results; a report without them gets bars without whiskers and says so)."""
    names = _ordered(evals)
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    have_ci = all("ci95" in evals[n] for n in names)
    for ax, key, title in ((axes[0], "ndcg5", "NDCG@5 (effective views)"),
                           (axes[1], "ild", "intra-list diversity (ILD)")):
        vals = [evals[n]["effective"]["ndcg5"] if key == "ndcg5" else evals[n]["ild"]
                for n in names]
        err = None
        if have_ci:
            cis = [evals[n]["ci95"][key] for n in names]
            err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
        colors = ["tab:red" if n == "higr" else "tab:blue" for n in names]
        ax.bar(range(len(names)), vals, yerr=err, capsize=4, color=colors)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3f}", (i, v), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title + ("" if have_ci else " (no intervals in this report)"))
        ax.set_ylabel("ILD (mean 1 - cosine)" if key == "ild" else "NDCG@5")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("test users, full catalogue; whiskers: 95% interval over users", fontsize=9)
    return _save(fig, out_dir / "models.png")


def quality_latency_points(report: dict, sweep: dict | None = None) -> list[dict]:
    """(decoder, beam, NDCG@5, interval, median ms) points for the quality-vs-latency plot:
    from a beam sweep (``bench/beam_sweep.py``'s ``beam_sweep.json`` in the run folder) when
    there is one, else the run's own evaluation and latency at its configured beam."""
    if sweep and sweep.get("points"):
        return sweep["points"]
    dec, ev = report.get("decode", {}), report.get("eval", {})
    out = []
    for name, model in (("higr", "higr"), ("flat", "flat")):
        if name in dec and model in ev:
            out.append({"decoder": name, "beam": dec.get("beam"), "batch": dec[name].get("batch"),
                        "ndcg5": ev[model]["effective"]["ndcg5"],
                        "ci95": ev[model].get("ci95", {}).get("ndcg5"),
                        "median_ms": dec[name]["median_ms"]})
    return out


def plot_quality_latency(points: list[dict], out_dir: Path) -> Path | None:
    """NDCG@5 against decoding latency, one line per decoder over beam widths (the paper's
    Figure 4 kind)."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    batch = points[0].get("batch")
    for name, color in (("higr", "tab:red"), ("flat", "tab:blue")):
        pts = sorted((p for p in points if p["decoder"] == name), key=lambda p: p["beam"] or 0)
        if not pts:
            continue
        xs = [p["median_ms"] for p in pts]
        ys = [p["ndcg5"] for p in pts]
        err = None
        if all(p.get("ci95") for p in pts):
            err = [[y - p["ci95"][0] for y, p in zip(ys, pts)],
                   [p["ci95"][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color,
                    label="HiGR coarse-to-fine" if name == "higr" else "flat beam search")
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"beam {p['beam']}", (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"median decode latency, ms per batch of {batch} users (log scale)")
    ax.set_ylabel("NDCG@5 (test users)")
    ax.set_title("quality vs latency over beam widths")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "quality_latency.png")


def plot_decode(decode: dict, out_dir: Path) -> Path | None:
    """Median and p99 latency of each decoder at each measured batch size."""
    by_batch = decode.get("by_batch") or ({str(decode["higr"].get("batch", "")): decode}
                                          if "higr" in decode else {})
    panels = [(b, d) for b, d in by_batch.items() if any(n in d for n in ("higr", "flat"))]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), cols=2, w=4.2, h=3.2)
    for ax, (batch, d) in zip(axes, panels):
        names = [n for n in ("higr", "flat") if n in d]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [d[n]["median_ms"] for n in names], width=0.4,
               label="median")
        ax.bar([x + 0.2 for x in xs], [d[n]["p99_ms"] for n in names], width=0.4, label="p99")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("ms per batch")
        title = f"decode latency, batch {batch}"
        if "speedup" in d:
            title += f" (HiGR {d['speedup']:.2f}x faster)"
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir / "decode_latency.png")


#: what each plot shows, for report.md
CAPTIONS = {
    "training_health": "Training health per stage: throughput (samples/s), MFU, share of step "
                       "time spent waiting for data, memory.",
    "loss": "Each stage's objective, term by term.",
    "diagnostics": "Diagnostics: validation NDCG@5 (the model selection), accuracies, codebook "
                   "perplexity and dead codes, preference pairs.",
    "models": "Every model's NDCG@5 and ILD on the test users, with 95% intervals.",
    "quality_latency": "Quality against decoding latency, HiGR and flat decoding over beam "
                       "widths.",
    "decode_latency": "Decoding latency of the served decoders.",
}


def write_plots(run_dir: Path, report: dict, tb_dirs: dict[str, Path]) -> list[Path]:
    """Every plot of the report into ``run_dir/plots`` (from the event files and the report)."""
    out_dir = RunLayout(run_dir).plots
    out_dir.mkdir(parents=True, exist_ok=True)
    series = stage_series(tb_dirs)
    sweep_file = RunLayout(run_dir).beam_sweep
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    made = [plot_health(series, out_dir), plot_losses(series, out_dir),
            plot_diagnostics(series, out_dir), plot_models(report.get("eval", {}), out_dir),
            plot_quality_latency(quality_latency_points(report, sweep), out_dir),
            plot_decode(report.get("decode", {}), out_dir)]
    made = [p for p in made if p]
    for old in out_dir.glob("*.png"):  # plots of an earlier layout of this report
        if old not in made:
            old.unlink()
    return made


def write_report(run_dir: str | Path, report: dict, tb_dirs: dict[str, Path]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` (+ plots/) into ``run_dir``."""
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    run.report_json.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    plots = write_plots(run_dir, report, tb_dirs)
    lines = [f"# higr-dist run report: {report.get('name', run_dir.name)}", ""]
    if "etl" in report:
        e = report["etl"]
        lines += ["## ETL", "", f"rows in {e['rows_in']:,}, out {e['rows_out']:,}, "
                  f"quarantined {e['rows_quarantined']:,} "
                  f"({json.dumps(e.get('quarantine_by_reason', {}))})", ""]
    if "tokenizer" in report:
        t = report["tokenizer"]
        lines += ["## Tokenizer (SID quality)", "", "| collision | concentration | consistency |",
                  "|---|---|---|", f"| {_fmt(t['collision'])} | {_fmt(t['concentration'])} | "
                  f"{_fmt(t['consistency'])} |", ""]
    if "eval" in report:
        lines += ["## Evaluation (leave-five-out, full catalogue)", "", eval_table(report["eval"]),
                  "", *comparison_lines(report["eval"]), ""]
    if report.get("selection"):
        lines += ["## Model selection (validation split)", "",
                  *selection_lines(report["selection"]), ""]
    if "decode" in report:
        lines += ["## Decoding latency", "", decode_table(report["decode"]), ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            caption = CAPTIONS.get(p.stem, p.stem)
            if p.stem == "quality_latency":
                caption += (" From `beam_sweep.json` (`bench/beam_sweep.py`)."
                            if run.beam_sweep.is_file() else
                            " At this run's beam only; `python bench/beam_sweep.py --run-dir "
                            f"{run_dir}` measures the other widths.")
            lines += [caption, "", f"![{p.stem}]({p.relative_to(run_dir)})", ""]
    lines += [f"TensorBoard: `tensorboard --logdir {report.get('tensorboard', run_dir)}`", ""]
    run.report_md.write_text("\n".join(lines))
    return run.report_json, run.report_md


def main(argv: list[str] | None = None) -> int:
    """``python -m higr_dist.eval.report --run-dir runs/demo``: rebuild ``report.md`` and its
    plots from the run's ``report.json`` and event files (no training, no evaluation)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__.split(":", 1)[1].strip())
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    run = RunLayout(run_dir)
    if not run.report_json.is_file():
        print(f"report: {run_dir} has no report.json; run `higr run` or `higr-eval` first",
              file=sys.stderr)
        return 2
    report = json.loads(run.report_json.read_text())
    tb = {d.name: run.stage(d.name).tensorboard for d in sorted(run_dir.iterdir())
          if run.stage(d.name).tensorboard.is_dir()}
    _, md = write_report(run_dir, report, tb)
    print(f"wrote {md} and {len(list(run.plots.glob('*.png')))} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
