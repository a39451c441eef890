"""Settings chosen on validation across the zoo: retrain one stage of every zoo run per variant.

    python bench/sweep.py --runs runs/zoo/runs --stage orpo \\
        --variant paper= --variant time=loss.pairs.chosen_order=time \\
        --variant lambda0.3=loss.lambda_or=0.3 --out bench/results/sweep_orpo.json
    python bench/sweep.py --runs runs/zoo/runs --stage hsd --stage flat --stage sasrec \\
        --variant e6= --variant e10=train.epochs=10 --out bench/results/sweep_epochs.json

Why
---
One set of defaults has to serve every log (issue #20), and baselines get the same care as
HiGR: the same grid, the same selection rule, on validation. ``--runs`` holds finished
``higr run`` folders (``bench/zoo.py``'s ``runs/``); for each run, each ``--stage`` and each
``--variant NAME=key=value[,key=value...]`` this trains the stage again exactly as the
pipeline launched it (``higr_dist.pipeline``: the run's own config, the sizing it derived from
the run's manifest, the real launcher) plus the variant's overrides, into
``<run>/sweep/<stage>-<NAME>/``. Nothing is scored here: the trainer's own periodic
validation (``higr_dist.engine.validate``) is the score, so a variant is judged exactly as
the pipeline selects weights. Test users are never read.

Per stage the table gives each variant's best validation NDCG@5 per log and its mean ratio to
the first variant (the reference; with no overrides it is the run's own stage, not retrained)
over the logs (logs differ in scale, ratios do not); the
variant with the highest mean ratio is the pick when it beats the reference by more than
``--min-gain`` (1% by default: a default changes for a gain a user would notice, not for
differences the size of one seed's noise), otherwise the reference stays. For alignment stages (validated at their
start too) the gain over the pretrained weights is listed as well: a variant can only help
there, since the pretrained weights stay a candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from higr_dist.config import load  # noqa: E402
from higr_dist.layout import RunLayout, StageLayout  # noqa: E402
from higr_dist.pipeline import (  # noqa: E402
    launch_command,
    sized_overrides,
    stage_config_path,
    stage_overrides,
)
from higr_dist.run_config import PipelineConfig  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"sweep: --variant needs NAME=overrides, got {text!r}")
    return name, [o for o in rest.split(",") if o]


def train(run_dir: Path, stage: str, name: str, extra: list[str]) -> dict:
    """Train ``stage`` of a finished run with ``extra`` overrides (reusing a finished variant;
    without overrides the run's own stage is the variant); the variant's summary."""
    layout = RunLayout(run_dir)
    if not extra and layout.stage(stage).summary.is_file():
        return json.loads(layout.stage(stage).summary.read_text())
    cfg = load(PipelineConfig, layout.resolved_config)
    manifest = json.loads(layout.etl.manifest.read_text())
    out = run_dir / "sweep" / f"{stage}-{name}"  # a stage folder of the variant
    summary = StageLayout(out).summary
    if not summary.is_file():
        overrides = [*stage_overrides(cfg, stage, sized_overrides(cfg, manifest)),
                     f"run.out_dir={out.resolve()}", "train.progress_bar=false", *extra]
        cmd = launch_command(cfg, stage_config_path(cfg, stage), overrides)
        print(f"[sweep] {run_dir.name} {stage} {name}: {' '.join(extra) or '(reference)'}",
              flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{stage}-{name}.log", "w") as fh:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"sweep: {run_dir.name} {stage} {name} failed; see "
                             f"{out.parent / f'{stage}-{name}.log'}")
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder of finished higr run folders")
    p.add_argument("--stage", action="append", required=True)
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=key=value[,key=value...]; the first is the reference")
    p.add_argument("--logs", default="", help="comma-separated run names (default: all)")
    p.add_argument("--min-gain", type=float, default=0.01,
                   help="a variant replaces the reference only when its mean ratio exceeds "
                        "1 + this")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    runs = sorted(d for d in Path(args.runs).iterdir() if RunLayout(d).report_json.is_file())
    if args.logs:
        runs = [d for d in runs if d.name in args.logs.split(",")]
    t0 = time.perf_counter()
    results: dict = {}
    for stage in args.stage:
        per = results.setdefault(stage, {})
        for run in runs:
            for name, extra in variants:
                s = train(run, stage, name, extra)
                v = s["validation"]
                per.setdefault(name, {})[run.name] = {
                    "best": v["best"]["ndcg5"], "best_step": v["best"]["step"],
                    "start": v["history"][0]["ndcg5"] if v["history"][0]["step"] == 0 else None,
                    "last": v["history"][-1]["ndcg5"], "final_step": s["final_step"],
                    "wall_s": round(s["wall_time_s"], 1), "overrides": extra}
    report: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                             "cpus": os.cpu_count(),
                             "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                             "wall_s": round(time.perf_counter() - t0, 1)},
                    "stages": results, "picks": {}}
    for stage, per in results.items():
        ref = variants[0][0]
        logs = list(per[ref])
        print(f"\n### {stage}: best validation NDCG@5\n")
        print("| variant | " + " | ".join(logs) + " | mean ratio to " + ref + " |")
        print("|---|" + "---|" * (len(logs) + 1))
        ratios = {}
        for name, _ in variants:
            r = statistics.fmean(per[name][g]["best"] / per[ref][g]["best"] for g in logs)
            ratios[name] = r
            cells = []
            for g in logs:
                x = per[name][g]
                gain = f" (+{x['best'] - x['start']:.4f})" if x["start"] is not None else ""
                cells.append(f"{x['best']:.4f}{gain}")
            print(f"| {name} | " + " | ".join(cells) + f" | {r:.4f} |")
        best = max(ratios, key=ratios.get)
        pick = best if ratios[best] > 1.0 + args.min_gain else ref
        report["picks"][stage] = {"variant": pick, "mean_ratio": ratios,
                                  "min_gain": args.min_gain}
        print(f"\npick for {stage}: {pick} (highest mean ratio: {best}, "
              f"{ratios[best]:.4f}; a change needs > {1.0 + args.min_gain:.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
