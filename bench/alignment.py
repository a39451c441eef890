"""Alignment ablation: no alignment vs ORPO with O1 / O2 / O3 / all objectives vs DPO (all).

    python bench/alignment.py --base /tmp/align_base --out bench/results/alignment.json
    python bench/alignment.py --base /tmp/align_base --out /tmp/sweep.json --steps 300 \\
        --lr 2e-4 --lambda-or 1.0 --variants none,orpo_all      # one point of a sweep

``--base`` is a finished pipeline run folder (``higr run``) or a copy of its ``etl/``,
``tokenizer/``, ``hsd/``, ``flat/`` and ``sasrec/`` sub-folders.

Design
------
- Training: every aligned variant starts from the same HSD checkpoint
  (``<base>/hsd/final/model_fp32.pt``) and trains through the real engine, launched as the
  pipeline launches a stage: ``torchrun --standalone --nproc_per_node 2 launcher/train.py``
  (``--launch torchrun``, the default: 2 gloo ranks, ZeRO-1) or ``python launcher/train.py``
  (``--launch single``: a world of one). The job is the shipped ``configs/tiny/{orpo,dpo}.yaml``
  with the run's paths, the HSD's own model section and the shared settings (steps, lr, batch,
  lambda, O2 fraction, DPO beta) as ``key=value`` overrides, so every variant differs only in
  its stage and ``loss.pairs.objectives``. A variant's run folder is named by a hash of its
  overrides (``<work>/<variant>-<hash>``): a re-run with the same settings reuses the finished
  run, a changed setting trains a fresh one (sweeps accumulate side by side).
- Evaluation: one streaming pass over the same test users (``--eval-users``, 0 = all) for
  every model, HiGR variants decoded by the trie-constrained coarse-to-fine decoder (beam 10),
  flat by flat beam search, SASRec top-5; headline metrics from
  :class:`higr_dist.eval.metrics.SlateMetrics` (the harness's exact sums). Per-user NDCG@5
  and ILD are kept too, for a paired bootstrap of each variant's difference to "none" (95% CI,
  same users resampled for both), so noise is stated next to every lift.
- TensorBoard check: the log-odds margin and pair accuracy (and per objective) are read back
  from each run's event files (first vs last logged window).
- Output: JSON (``--out``) with the settings, per-variant training summary, metrics, CIs and
  the targets of issue #5; Markdown tables in the shape of the paper's Table 6 (objectives)
  and Table 4 (alignment method) on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from higr_dist.eval.metrics import SlateMetrics  # noqa: E402

#: the paper's Table 6 rows, then Table 4's DPO row
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "none": (None, []),
    "orpo_o1": ("orpo", ["o1"]),
    "orpo_o2": ("orpo", ["o2"]),
    "orpo_o3": ("orpo", ["o3"]),
    "orpo_all": ("orpo", ["o1", "o2", "o3"]),
    "dpo_all": ("dpo", ["o1", "o2", "o3"]),
}


@dataclass
class Settings:
    """What every aligned variant shares (the comparison is fair only if these are equal)."""

    steps: int = 150
    """Optimiser steps per variant."""
    lr: float = 5e-4
    """Peak learning rate (warmup then cosine to ``min_lr_ratio``, the engine's schedule)."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    global_batch: int = 128
    """Contexts per optimiser step (each with 1 chosen + R rejected slates)."""
    micro_batch: int = 64
    """Contexts per rank and micro-step (grad accumulation derived by the engine)."""
    lambda_or: float = 1.0
    """ORPO odds-ratio weight (the shipped configs/tiny/orpo.yaml value)."""
    nll_weight: float = 1.0
    """ORPO NLL(y+) weight."""
    o2_fraction: float = 0.5
    """Share of y+ positions O2 replaces by negative-feedback items."""
    o3_similarity: str = "embedding"
    """O3 neighbours: ``sid_prefix`` (shared SID prefix) or ``embedding`` (nearest by cosine)."""
    o3_embedding: str = "item_features.npy"
    """Embedding file in the SID export for O3 (``item_emb.npy`` or ``item_features.npy``)."""
    beta: float = 0.1
    """DPO inverse temperature (sequence log-probs summed over the N*L codes)."""
    dpo_nll_weight: float = 0.0
    """DPO's optional NLL(y+) term."""
    seed: int = 0
    """Run seed of every variant."""
    extra: list[str] = field(default_factory=list)
    """Further ``key=value`` overrides for every aligned variant (``--set``)."""

    def overrides(self, stage: str) -> list[str]:
        common = [f"run.seed={self.seed}", f"train.max_steps={self.steps}", f"train.lr={self.lr}",
                  f"train.warmup_steps={self.warmup_steps}",
                  f"train.global_batch_size={self.global_batch}",
                  f"train.micro_batch_size={self.micro_batch}", "train.checkpoint_every=0",
                  "train.progress_bar=false", f"loss.pairs.o2_replace_fraction={self.o2_fraction}",
                  f"loss.pairs.o3_similarity={self.o3_similarity}",
                  f"loss.pairs.o3_embedding={self.o3_embedding}"]
        if stage == "orpo":
            common += [f"loss.lambda_or={self.lambda_or}", f"loss.nll_weight={self.nll_weight}"]
        else:
            common += [f"loss.beta={self.beta}", f"loss.nll_weight={self.dpo_nll_weight}"]
        return common + list(self.extra)


# ---------------------------------------------------------------------------------------------
# training (the real engine, launched like the pipeline launches a stage)
# ---------------------------------------------------------------------------------------------


def model_overrides(hsd_dir: Path) -> list[str]:
    """The pretrained HSD's own ``model:`` section as overrides (same architecture for sure)."""
    model = yaml.safe_load((hsd_dir / "resolved_config.yaml").read_text())["model"]
    return [f"model.{k}={json.dumps(v)}" for k, v in sorted(model.items())]


def launch_command(launch: str, nproc: int, config: Path, overrides: list[str]) -> list[str]:
    script = str(ROOT / "launcher" / "train.py")
    if launch == "single":
        return [sys.executable, script, "--config", str(config), *overrides]
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [exe, "--standalone", "--nproc_per_node", str(nproc), script, "--config", str(config),
            *overrides]


def train_variant(name: str, base: Path, work: Path, settings: Settings, launch: str,
                  nproc: int) -> tuple[Path, dict, float]:
    """Train one aligned variant (or reuse its finished run); (run dir, summary, seconds)."""
    stage, objectives = VARIANTS[name]
    assert stage is not None
    config = ROOT / "configs" / "tiny" / f"{stage}.yaml"
    init = (base / "hsd" / "final" / "model_fp32.pt").resolve()
    ov = [f"inputs.etl_dir={(base / 'etl').resolve()}",
          f"inputs.sid_dir={(base / 'tokenizer' / 'export').resolve()}",
          f"inputs.init_from={init}", *model_overrides(base / "hsd"),
          f"loss.pairs.objectives={json.dumps(objectives)}", *settings.overrides(stage)]
    if stage == "dpo":
        ov.append(f"inputs.reference_from={init}")
    key = hashlib.sha256(json.dumps([launch, nproc, config.read_text(), ov]).encode()).hexdigest()
    out = work / f"{name}-{key[:10]}"
    summary = out / "summary.json"
    if summary.is_file() and (out / "final" / "model_fp32.pt").is_file():
        print(f"[alignment] {name}: reusing {out}", flush=True)
        return out, json.loads(summary.read_text()), 0.0
    ov += [f"run.name=align-{name}", f"run.out_dir={out.resolve()}"]
    secs = run_training(launch_command(launch, nproc, config, ov), f"[alignment] {name}")
    return out, json.loads(summary.read_text()), secs


def run_training(cmd: list[str], label: str) -> float:
    """Run one training launch in a clean environment (no inherited rank variables); seconds."""
    print(f"{label}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t


def tb_first_last(run_dir: Path, tags: list[str]) -> dict[str, dict]:
    """First and last logged value of each tag in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    out = {}
    for tag in tags:
        if tag in have:
            ev = acc.Scalars(tag)
            out[tag] = {"first": ev[0].value, "last": ev[-1].value, "points": len(ev),
                        "rose": ev[-1].value > ev[0].value}
    return out


# ---------------------------------------------------------------------------------------------
# evaluation (same users, every model, per-user values kept for paired CIs)
# ---------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """Headline metrics plus per-user NDCG@5 (effective users) and ILD (all users)."""

    total: SlateMetrics
    ndcg: list[float] = field(default_factory=list)
    ild: list[float] = field(default_factory=list)

    def update(self, pred: np.ndarray, tgt: np.ndarray, fb: np.ndarray, emb: np.ndarray,
               threshold: float) -> None:
        """pred [B, 5], tgt [B, T], fb [B, T]: the exact sums and per-user values."""
        self.total.update(pred, tgt, fb, emb)
        for b in range(pred.shape[0]):
            one = SlateMetrics(threshold)
            one.update(pred[b:b + 1], tgt[b:b + 1], fb[b:b + 1], emb)
            if one.counts["eff_users"]:
                self.ndcg.append(one.sums["eff_ndcg"])
            self.ild.append(one.sums["ild"] if one.counts["ild_users"] else float("nan"))


def predictors(base: Path, runs: dict[str, Path], beam: int) -> tuple[dict, object]:
    """name -> (SlateBatch -> item_idx [B, 5]) for every variant plus flat and SASRec."""
    from higr_dist.eval.harness import (
        flat_predictor,
        higr_predictor,
        load_stage_model,
        load_trie,
        sasrec_predictor,
    )

    trie = load_trie(base / "tokenizer" / "export")
    preds, hsd = {}, None
    for name, run in runs.items():
        _, m = load_stage_model(run)
        hsd = hsd or m
        preds[name] = higr_predictor(m, trie, beam)
    if (base / "flat" / "final" / "model_fp32.pt").is_file():
        preds["flat"] = flat_predictor(load_stage_model(base / "flat")[1], trie, beam)
    if (base / "sasrec" / "final" / "model_fp32.pt").is_file():
        preds["sasrec"] = sasrec_predictor(load_stage_model(base / "sasrec")[1])
    return preds, hsd


def evaluate_all(base: Path, runs: dict[str, Path], users: int, beam: int,
                 threshold: float, split: str = "test") -> dict[str, Scored]:
    preds, hsd = predictors(base, runs, beam)
    return score_predictors(base, preds, hsd.cfg.N, hsd.cfg.history_len, users, threshold,
                            split)


def score_predictors(base: Path, preds: dict, n: int, history_len: int, users: int,
                     threshold: float, split: str = "test") -> dict[str, Scored]:
    """One streaming pass over a held-out split of ``base``: every predictor on the same users."""
    from higr_dist.eval.harness import test_batches
    from higr_dist.stages.hsd import SlateCollate

    sid = base / "tokenizer" / "export"
    collate = SlateCollate(sid, n, history_len)
    emb = np.load(sid / "item_features.npy", mmap_mode="r")
    scored = {name: Scored(SlateMetrics(threshold)) for name in preds}
    with torch.inference_mode():
        for batch, _ in test_batches(base / "etl", collate, 64, users, split=split):
            tgt, fb = batch.target_items.numpy(), batch.target_fb.numpy()
            for name, fn in preds.items():
                scored[name].update(fn(batch), tgt, fb, emb, threshold)
    return scored


def paired_ci(a: list[float], b: list[float], reps: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over paired users with a 95% bootstrap interval (NaN pairs dropped)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    d = x[ok] - y[ok]  # [n]
    idx = np.random.default_rng(seed).integers(0, len(d), (reps, len(d)))  # [reps, n]
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "users": int(len(d))}


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

ROW_LABELS = {"none": "none (w/o alignment)", "orpo_o1": "ORPO O1 (ranking)",
              "orpo_o2": "ORPO O2 (interest)", "orpo_o3": "ORPO O3 (diversity)",
              "orpo_all": "ORPO all", "dpo_all": "DPO all", "flat": "flat (baseline)",
              "sasrec": "SASRec (baseline)"}


def _row(name: str, m: dict, ci: dict | None) -> str:
    nd, ild = m["effective"]["ndcg5"], m["ild"]
    lift = (f"{ci['ndcg']['diff']:+.4f} [{ci['ndcg']['ci95'][0]:+.4f}, "
            f"{ci['ndcg']['ci95'][1]:+.4f}] | {ci['ild']['diff']:+.4f} "
            f"[{ci['ild']['ci95'][0]:+.4f}, {ci['ild']['ci95'][1]:+.4f}]") if ci else "- | -"
    return (f"| {ROW_LABELS.get(name, name)} | {nd:.4f} | {m['effective']['recall5']:.4f} | "
            f"{m['impressions']['recall5']:.4f} | {ild:.4f} | {lift} |")


def tables(metrics: dict[str, dict], cis: dict[str, dict]) -> str:
    head = ("| model | NDCG@5 (eff.) | Recall@5 (eff.) | Recall@5 (imp.) | ILD | "
            "NDCG@5 vs none [95% CI] | ILD vs none [95% CI] |\n|---|---|---|---|---|---|---|")
    t6 = [n for n in ("none", "orpo_o1", "orpo_o2", "orpo_o3", "orpo_all") if n in metrics]
    t4 = [n for n in ("sasrec", "flat", "none", "dpo_all", "orpo_all") if n in metrics]
    out = ["Objectives (paper Table 6):", "", head, *[_row(n, metrics[n], cis.get(n)) for n in t6],
           "", "Alignment method (paper Table 4) and baselines:", "", head,
           *[_row(n, metrics[n], cis.get(n)) for n in t4]]
    return "\n".join(out)


def targets(metrics: dict[str, dict], cis: dict[str, dict]) -> dict:
    """Issue #5: ORPO-all lifts NDCG@5 and ILD over none; aligned >= 1.10x best baseline."""
    out: dict = {}
    if "orpo_all" in metrics and "none" in metrics:
        c = cis["orpo_all"]
        out["orpo_all_lifts_ndcg"] = c["ndcg"]["diff"] > 0
        out["orpo_all_lifts_ndcg_ci_excludes_0"] = c["ndcg"]["ci95"][0] > 0
        out["orpo_all_lifts_ild"] = c["ild"]["diff"] > 0
        out["orpo_all_lifts_ild_ci_excludes_0"] = c["ild"]["ci95"][0] > 0
    base = [metrics[n]["effective"]["ndcg5"] for n in ("flat", "sasrec") if n in metrics]
    if base and "orpo_all" in metrics:
        ratio = metrics["orpo_all"]["effective"]["ndcg5"] / max(base)
        out["orpo_all_ndcg_over_best_baseline"] = ratio
        out["orpo_all_ge_1.10x_best_baseline"] = ratio >= 1.10
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="finished pipeline run (etl, tokenizer, hsd, ...)")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--work", default=None, help="variant run folders (default <base>/alignment)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--launch", choices=["torchrun", "single"], default="torchrun")
    p.add_argument("--nproc", type=int, default=2, help="ranks with --launch torchrun")
    d = Settings()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--global-batch", type=int, default=d.global_batch)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--lambda-or", type=float, default=d.lambda_or)
    p.add_argument("--nll-weight", type=float, default=d.nll_weight)
    p.add_argument("--o2-fraction", type=float, default=d.o2_fraction)
    p.add_argument("--o3-similarity", choices=["sid_prefix", "embedding"],
                   default=d.o3_similarity)
    p.add_argument("--o3-embedding", default=d.o3_embedding)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--dpo-nll-weight", type=float, default=d.dpo_nll_weight)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--set", action="append", default=[], help="extra key=value override")
    p.add_argument("--eval-users", type=int, default=0, help="held-out users (0 = all)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="held-out split to score: val to choose settings, test to report")
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--effective-threshold", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for evaluation (1: other jobs share the cores)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(args.base)
    work = Path(args.work) if args.work else base / "alignment"
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    settings = Settings(args.steps, args.lr, args.warmup, args.global_batch, args.micro_batch,
                        args.lambda_or, args.nll_weight, args.o2_fraction,
                        args.o3_similarity, args.o3_embedding, args.beta,
                        args.dpo_nll_weight, args.seed, list(args.set))
    t0 = time.perf_counter()
    runs: dict[str, Path] = {"none": base / "hsd"} if "none" in names else {}
    train_info: dict[str, dict] = {}
    tags = ["loss/margin", "loss/pair_acc", "loss/nll"] + [
        f"loss/{m}_{o}" for m in ("margin", "pair_acc") for o in ("o1", "o2", "o3")]
    for name in names:
        if VARIANTS[name][0] is None:
            continue
        run, summ, secs = train_variant(name, base, work, settings, args.launch, args.nproc)
        runs[name] = run
        train_info[name] = {"run_dir": str(run), "train_seconds": round(secs, 1),
                            "wall_time_s": summ.get("wall_time_s"),
                            "world_size": summ.get("world_size"),
                            "final_step": summ.get("final_step"),
                            "final_losses": summ["losses"]["final"],
                            "tensorboard": tb_first_last(run, tags)}
    t_train = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    scored = evaluate_all(base, runs, args.eval_users, args.beam, args.effective_threshold,
                          args.split)
    t_eval = time.perf_counter() - t
    metrics = {n: s.total.result() for n, s in scored.items()}
    cis = {}
    if "none" in scored:
        ref = scored["none"]
        cis = {n: {"ndcg": paired_ci(s.ndcg, ref.ndcg), "ild": paired_ci(s.ild, ref.ild)}
               for n, s in scored.items() if n != "none"}
    # the aligned model against each baseline on the same users (issue #4's and #5's bars)
    vs_baselines = {f"{a}_minus_{b}": paired_ci(scored[a].ndcg, scored[b].ndcg)
                    for a in ("orpo_all", "none") if a in scored
                    for b in ("flat", "sasrec") if b in scored}
    result = {
        "bench": "alignment", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "loadavg": os.getloadavg()},
        "command": " ".join([sys.executable, *sys.argv]),
        "base": str(base), "launch": args.launch,
        "nproc": args.nproc if args.launch == "torchrun" else 1,
        "settings": settings.__dict__, "split": args.split, "eval_users": args.eval_users,
        "beam": args.beam,
        "effective_threshold": args.effective_threshold,
        "metrics": metrics, "vs_none": cis, "ndcg_vs_baselines": vs_baselines,
        "targets": targets(metrics, cis),
        "training": train_info,
        "seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(tables(metrics, cis))
    for k, c in vs_baselines.items():
        print(f"NDCG@5 {k.replace('_minus_', ' minus ')}: {c['diff']:+.4f} "
              f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] ({c['users']} users)")
    print(json.dumps(result["targets"], indent=2))
    print(f"[alignment] train {t_train:.0f}s, eval {t_eval:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
