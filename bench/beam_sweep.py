"""Quality against latency over beam widths: HiGR coarse-to-fine vs flat beam search on a
finished run's own trained models (the paper's Figure 4 kind).

    python bench/beam_sweep.py --run-dir runs/demo --beams 1 2 5 10 20
    python -m higr_dist.eval.report --run-dir runs/demo   # report.md's quality_latency.png

For each beam width: NDCG@5 of HiGR and flat on the test users (``higr_dist.eval.harness``'s
predictors and streaming evaluation, with 95% intervals over users) and the median latency of
one batch of ``--batch`` users (``harness.decode_latency``: interleaved timed calls after a
warm-up). Writes ``<run-dir>/beam_sweep.json`` (or ``--out``), which the run's report plots
when it is rebuilt. Nothing is trained; only the test split is read.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def sweep(run_dir: Path, beams: list[int], batch: int, users: int, repeats: int,
          rank: str, threshold: float) -> list[dict]:
    from higr_dist.data.slates import SlateCollate
    from higr_dist.eval.harness import decode_latency, evaluate, make_predictors
    from higr_dist.layout import RunLayout

    layout = RunLayout(run_dir)
    etl_dir, sid_dir = layout.etl.root, layout.sids
    item_emb = np.load(sid_dir / "item_features.npy", mmap_mode="r")
    points = []
    for beam in beams:
        preds, models = make_predictors(run_dir, sid_dir, beam, rank)
        preds = {k: v for k, v in preds.items() if k in ("higr", "flat")}
        hcfg = models["higr"].cfg
        collate = SlateCollate(sid_dir, hcfg.N, hcfg.history_len)
        t = time.perf_counter()
        evals = evaluate(preds, etl_dir, collate, item_emb, batch, users, threshold)
        lat = decode_latency(models, etl_dir, collate, beam, rank, [batch], repeats)
        for name in preds:
            r = evals[name]
            points.append({"decoder": name, "beam": beam, "batch": lat[name]["batch"],
                           "ndcg5": r["effective"]["ndcg5"], "ci95": r["ci95"]["ndcg5"],
                           "recall5": r["effective"]["recall5"], "ild": r["ild"],
                           "users": r["users"], "median_ms": lat[name]["median_ms"],
                           "p99_ms": lat[name]["p99_ms"]})
            print(f"beam {beam:>3} {name:>5}: NDCG@5 {r['effective']['ndcg5']:.4f} "
                  f"[{r['ci95']['ndcg5'][0]:.4f}, {r['ci95']['ndcg5'][1]:.4f}]  "
                  f"median {lat[name]['median_ms']:.1f} ms per batch of {lat[name]['batch']}",
                  flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a finished `higr run` folder")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    p.add_argument("--batch", type=int, default=64, help="users per decode call (latency)")
    p.add_argument("--users", type=int, default=0, help="test users to score (0: all)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per decoder and beam")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", help="JSON (default <run-dir>/beam_sweep.json)")
    args = p.parse_args(argv)
    from higr_dist.layout import RunLayout

    run_dir = Path(args.run_dir)
    layout = RunLayout(run_dir)
    if not layout.resolved_config.is_file():
        print(f"beam_sweep: {run_dir} is not a `higr run` folder", file=sys.stderr)
        return 2
    from higr_dist.config import load
    from higr_dist.run_config import PipelineConfig

    cfg = load(PipelineConfig, layout.resolved_config)
    torch.set_num_threads(args.threads)
    points = sweep(run_dir, sorted(args.beams), args.batch, args.users, args.repeats,
                   cfg.eval.rank, cfg.eval.effective_threshold)
    out = Path(args.out) if args.out else layout.beam_sweep
    out.write_text(json.dumps({
        "bench": "beam_sweep", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else
                                                        sys.argv[1:])]),
        "run_dir": str(run_dir), "rank": cfg.eval.rank, "points": points}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
