"""Run reports: ``report.json`` for scripts, ``report.md`` + PNG plots for people.

The JSON layout is a contract (scripts read it; see README and issue #4):
``etl.{rows_in,rows_out,rows_quarantined}``, ``tokenizer.{collision,concentration,consistency}``,
``eval.<model>.{impressions.{hit5,recall5}, effective.{hit5,recall5,ndcg5}, ild}``,
``decode.{higr,flat}.{median_ms,p99_ms,slates_per_s}``, ``decode.speedup``, ``tensorboard``.

Plots read the TensorBoard event files the trainer wrote (the single source of truth for curves),
so a report can be rebuilt for any finished run without re-training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def plot_curves(tb_dirs: dict[str, Path], out_dir: Path) -> list[Path]:
    """loss curves and throughput per stage -> PNGs; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    series = {stage: read_scalars(d) for stage, d in tb_dirs.items() if Path(d).is_dir()}
    for kind, pick in (("loss", lambda t: t.startswith("loss/")),
                       ("throughput", lambda t: t in ("perf/samples_per_s", "perf/tokens_per_s"))):
        stages = [s for s in series if any(pick(t) for t in series[s])]
        if not stages:
            continue
        fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            for tag, pts in sorted(series[stage].items()):
                if pick(tag) and pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=tag.split("/", 1)[-1])
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_decode(decode: dict, out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("higr", "flat") if n in decode]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    med = [decode[n]["median_ms"] for n in names]
    p99 = [decode[n]["p99_ms"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], med, width=0.4, label="median")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms per batch")
    ax.set_title("decode latency")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "decode_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, report: dict, tb_dirs: dict[str, Path]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` (+ plots/) into ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    plots = plot_curves(tb_dirs, run_dir / "plots")
    dec = plot_decode(report.get("decode", {}), run_dir / "plots")
    if dec:
        plots.append(dec)
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
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += [f"TensorBoard: `tensorboard --logdir {report.get('tensorboard', run_dir)}`", ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return run_dir / "report.json", md
