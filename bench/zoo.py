"""The data zoo: the main job (``higr run``) on logs of different structure, one table.

    python bench/zoo.py --out bench/results/zoo.json                  # every log, ~1 h on 2 cores
    python bench/zoo.py --logs transition,movielens --work /tmp/zoo   # a subset
    python bench/zoo.py --movielens /path/to/ml-100k                  # GroupLens's own folder

Why
---
A default chosen on one log does not carry over to another (METHOD.md, "When semantic IDs
lose to item IDs"). Every setting of the main job is therefore judged here, on several logs at
once, each run exactly as a user runs it: ``higr run --config <run.yaml> --interactions LOG
--items ITEMS`` with the shipped defaults, nothing tuned per log. The logs:

- ``taste``: the demo's own Spark generator (sub-topic tastes that drift; ``make demo``);
- ``transition``: item-to-item successors (``bench/zoo_logs.py``);
- ``trend``: time-varying popularity (``bench/zoo_logs.py``);
- ``content``: captions that spell out the fine topic users choose by (``bench/zoo_logs.py``);
- ``movielens``: real MovieLens-100k through the ETL's ``movielens`` adapter
  (``bench/movielens.py`` finds it: a GroupLens folder, RecBole's wheel, or a download).

Per log the table gives every model's test NDCG@5 (effective views), recall@5 and ILD, HiGR
minus SASRec / flat / popularity with the paired bootstrap 95% interval the report computes
over the same users, each model's best validation NDCG@5 (the selection score) and the wall
time. The checks of the quality bar are computed from those figures, never typed in.

Protocol (the report's, ``higr_dist.eval``): leave-five-out, the last 5 interactions of each
user are the test slate and the 5 before them the validation slate; full-catalogue ranking;
NDCG@5 against the held-out items with watch ratio >= 2.0 (MovieLens: rating >= 4 under the
adapter's default map); models selected on validation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from higr_dist.configs import HERE as CONFIGS
from higr_dist.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import zoo_logs  # noqa: E402

LOGS = ("taste", "transition", "trend", "content", "movielens")
MODELS = ("higr", "higr_no_align", "flat", "sasrec", "popularity")


def prepare(log: str, work: Path, movielens: str | None) -> list[str]:
    """The ``higr run`` arguments that point the run at this log's data."""
    if log == "taste":
        return []  # the run config's embedded synthetic source
    if log == "movielens":
        from movielens import ml100k_files

        inter, items = ml100k_files(movielens, work / "data" / "movielens")
        return ["--interactions", str(inter), "--items", str(items),
                "etl_overrides=[source.format=movielens]"]
    folder = work / "data" / log
    if not (folder / "items.csv").is_file():
        zoo_logs.write(zoo_logs.GENERATORS[log](), folder)
    return ["--interactions", str(folder / "interactions.csv"), "--items",
            str(folder / "items.csv")]


def run_log(log: str, work: Path, config: str, extra: list[str], movielens: str | None
            ) -> dict:
    """``higr run`` on one log (reusing a finished run folder); its report and wall time."""
    name = f"zoo-{log}"
    report = RunLayout(work / "runs" / name).report_json
    t0 = time.perf_counter()
    if not report.is_file():
        cmd = [sys.executable, "-m", "higr_dist", "run", "--config", config,
               "--name", name, *prepare(log, work, movielens), f"out_root={work / 'runs'}",
               *extra]
        print(f"[zoo] {log}: {' '.join(cmd)}", flush=True)
        with open(work / f"{name}.log", "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            raise SystemExit(f"zoo: {log} failed (exit {proc.returncode}); see "
                             f"{work / f'{name}.log'}")
    wall = time.perf_counter() - t0
    data = json.loads(report.read_text())
    data["zoo_wall_s"] = round(wall, 1)
    return data


def rank_ablation(run_dir: Path) -> dict:
    """Validation NDCG@5 of the kept HiGR and flat models under each slate ranking
    (``higr_dist.decode.hier.RANKS``): the evidence for the shipped ``eval.rank``."""
    from higr_dist.decode.hier import RANKS
    from higr_dist.engine.validate import ValidateConfig, Validator
    from higr_dist.eval.harness import load_stage_model

    layout = RunLayout(run_dir)
    cache = run_dir / "zoo_rank_ablation.json"  # the kept models do not change once trained
    if cache.is_file():
        return json.loads(cache.read_text())
    out: dict = {}
    for name, stage in (("higr", "orpo"), ("higr_no_align", "hsd"), ("flat", "flat")):
        if not layout.stage(stage).final_weights.is_file():
            continue
        _, model = load_stage_model(layout.stage(stage).root)
        for rank in RANKS:
            v = Validator(layout.etl.root, layout.sids, model.cfg.N,
                          model.cfg.history_len, ValidateConfig(every_epochs=1, rank=rank))
            out.setdefault(name, {})[rank] = v.score(model)["ndcg5"]
    cache.write_text(json.dumps(out, indent=1))
    return out


def summarise(log: str, report: dict) -> dict:
    """The figures of one log that the table and the checks need."""
    ev = report["eval"]
    out: dict = {"etl": report["etl"], "tokenizer": report.get("tokenizer", {}),
                 "timings_s": report.get("timings_s", {}), "models": {},
                 "selection": report.get("selection", {})}
    for m in MODELS:
        if m not in ev:
            continue
        r = ev[m]
        out["models"][m] = {"ndcg5": r["effective"]["ndcg5"], "recall5": r["effective"]["recall5"],
                            "imp_recall5": r["impressions"]["recall5"], "ild": r["ild"],
                            "higr_minus": r.get("higr_minus_ndcg5")}
    return out


def checks(logs: dict[str, dict]) -> dict:
    """The quality bar, computed from the figures (issue #20's "Must show")."""
    rows, above = {}, []
    for log, s in logs.items():
        m = s["models"]
        higr, sas, pop = m["higr"]["ndcg5"], m["sasrec"]["ndcg5"], m["popularity"]["ndcg5"]
        ci = m["sasrec"]["higr_minus"]["ci95"]
        rows[log] = {
            "higr_vs_sasrec_upper_ci_above_0": ci[1] > 0,
            "higr_at_least_1.5x_popularity": higr >= 1.5 * pop,
            "higr_at_least_flat": higr >= m["flat"]["ndcg5"] if "flat" in m else None,
            "higr_above_sasrec_lower_ci_above_0": ci[0] > 0,
            "higr_over_sasrec": higr / sas if sas else None,
            "higr_over_popularity": higr / pop if pop else None,
        }
        if ci[0] > 0:
            above.append(log)
    return {"per_log": rows, "logs_where_higr_beats_sasrec": above,
            "all_met": all(r["higr_vs_sasrec_upper_ci_above_0"]
                           and r["higr_at_least_1.5x_popularity"]
                           and r["higr_at_least_flat"] is not False for r in rows.values())
            and len(above) >= 2}


def table(logs: dict[str, dict]) -> str:
    head = ("| log | items | users | HiGR | HiGR w/o align | flat | SASRec | popularity | "
            "HiGR - SASRec [95% CI] | HiGR - flat [95% CI] | ILD HiGR / SASRec |")
    lines = [head, "|" + "---|" * 11]
    def nd(m: dict, k: str) -> str:
        return f"{m[k]['ndcg5']:.4f}" if k in m else "-"

    def ci(m: dict, k: str) -> str:
        c = m.get(k, {}).get("higr_minus")
        return f"{c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c else "-"

    for log, s in logs.items():
        m = s["models"]

        lines.append(f"| {log} | {s['etl']['num_items']:,} | {s['etl']['num_users']:,} | "
                     f"**{nd(m, 'higr')}** | {nd(m, 'higr_no_align')} | {nd(m, 'flat')} | "
                     f"{nd(m, 'sasrec')} | {nd(m, 'popularity')} | {ci(m, 'sasrec')} | "
                     f"{ci(m, 'flat')} | "
                     f"{m['higr']['ild']:.3f} / {m['sasrec']['ild']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", default=",".join(LOGS), help=f"comma-separated, from {LOGS}")
    p.add_argument("--work", default="runs/zoo", help="data and run folders")
    p.add_argument("--config", default=str(CONFIGS / "tiny" / "run.yaml"))
    p.add_argument("--movielens", default=None,
                   help="GroupLens ml-100k folder, RecBole folder or wheel (default: download)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config, for "
                   "every log (ablations)")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = [x for x in args.logs.split(",") if x]
    unknown = sorted(set(logs) - set(LOGS))
    if unknown:
        print(f"zoo: unknown log(s) {unknown}; known: {', '.join(LOGS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = {}
    for log in logs:
        results[log] = summarise(log, run_log(log, work, args.config, args.overrides,
                                              args.movielens))
        results[log]["val_ndcg5_by_rank"] = rank_ablation(work / "runs" / f"zoo-{log}")
        results[log]["wall_s"] = results[log]["timings_s"].get("total")
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "config": args.config, "overrides": args.overrides,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    # the main jobs' own wall times (what the zoo costs from scratch, also
                    # when this call reused finished runs)
                    "runs_wall_s": round(sum(r["timings_s"].get("total", 0.0)
                                             for r in results.values()), 1)},
           "logs": results, "checks": checks(results)}
    print(table(results))
    print(json.dumps(out["checks"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
