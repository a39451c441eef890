"""Offline evaluation, decode latency and slate generation for a finished pipeline run.

Launch::

    higr-eval --run-dir runs/demo                      # re-evaluate, rewrite report.json/.md
    higr-generate --run-dir runs/demo --num-users 20 --out slates.jsonl

Design
------
Every model is rebuilt from its own run folder (``resolved_config.yaml`` -> stage.build) and
loaded from the consolidated fp32 export (``final/model_fp32.pt``), so evaluation sees exactly
what serving would. All models answer the same question on the same test users (leave-five-out,
full catalogue): a ranked slate of N = 5 items per user.

- ``higr`` (ORPO-aligned HSD when the alignment stage ran) and ``higr_no_align`` (the pretrained
  HSD): trie-constrained coarse-to-fine decoding;
- ``higr_dpo``: the DPO-aligned HSD, when the optional ``dpo`` stage ran (comparison);
- ``flat``: trie-constrained beam search over the flattened N*L codes;
- ``sasrec``: top-5 next items;
- ``popularity``: the 5 items most often in training targets (counted streaming).

Test slates stream from the shards (never all in memory); metrics accumulate exact sums
(``SlateMetrics``). Latency is measured on the same users with repeated timed calls after a
warm-up; we report the median and p99 and the ratio of medians.

CLI errors: a run folder that is missing or unfinished, an unreadable config, ``--users`` file
or shard, an unknown device or an untrained ``--model`` print one line and exit 2 (never a
traceback; ``tests/test_faults_config.py`` fuzzes both CLIs).

Device: models are placed on ``eval.device`` (``--device`` of both CLIs): ``auto`` = the first
CUDA device when there is one, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``. Predictors move
each batch to their model's device and hand back host arrays (``higr_dist.eval.predict``);
decode timings synchronise the device before reading the clock, so GPU latency is the
kernels' time, not their launch time. Models stay fp32 (the exported weights) on any device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from higr_dist.data.loader import iterate_samples
from higr_dist.data.shardio import list_shards
from higr_dist.data.slates import SlateCollate
from higr_dist.decode.hier import RANKS
from higr_dist.decode.trie import SidTrie
from higr_dist.eval.metrics import SlateMetrics, paired_bootstrap
from higr_dist.eval.predict import Predict, slate_predictor
from higr_dist.layout import EtlLayout, RunLayout, StageLayout
from higr_dist.models import card as model_card
from higr_dist.schema import FOLDERS


def _threads() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device (``auto``: cuda:0 when CUDA is
    available, else the CPU); ValueError with one line when it is unknown or unavailable."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available on this machine (use cpu or "
                         "auto)")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_stage_model(stage_dir: Path, device: torch.device | str = "cpu"):
    """(model card, model) for a trained stage folder: the model its card names
    (:mod:`higr_dist.models.card`) with its exported weights, eval mode, on ``device``."""
    folder = StageLayout(Path(stage_dir))
    if not folder.model_card.is_file():
        raise FileNotFoundError(
            f"{folder.model_card} is missing: {folder.root} holds no finished model (a stage "
            "trained by an older version wrote none; rerun `higr run` with the same --name: "
            "the stage resumes from its last checkpoint and exports it)")
    try:
        card = _read_json(folder.model_card)
        model = model_card.build(card)
    except (ValueError, TypeError, AttributeError, ImportError) as e:  # a damaged card
        from higr_dist.config import ConfigError

        raise ConfigError([f"{folder.model_card}: not a model card ({e})"]) from e
    state = torch.load(folder.final_weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    return card, model


def test_batches(etl_dir: Path, collate, batch_size: int, max_users: int = 0,
                 split: str = "test") -> Iterator:
    """Stream a held-out split in batches of ``batch_size`` (at most ``max_users`` users):
    ``test`` (each user's last N interactions) or ``val`` (the N before them, for model
    selection; its history stops before the validation window)."""
    buf, seen = [], 0
    kind = f"slates/{split}"
    for s in iterate_samples(list_shards(EtlLayout(Path(etl_dir)).kind(kind)), FOLDERS[kind]):
        buf.append(s)
        seen += 1
        if len(buf) == batch_size:
            yield collate(buf), buf
            buf = []
        if max_users and seen >= max_users:
            break
    if buf:
        yield collate(buf), buf


def popularity_top(etl_dir: Path, k: int = 5) -> np.ndarray:
    """The k items most frequent among training target slates (streaming count)."""
    counts: Counter[int] = Counter()
    for s in iterate_samples(list_shards(EtlLayout(Path(etl_dir)).kind("slates/train")),
                             FOLDERS["slates/train"]):
        counts.update(s["target_items"])
    return np.array([i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]])


def make_predictors(run_dir: Path, sid_dir: Path, beam: int, rank: str = "placed",
                    device: torch.device | str = "cpu") -> tuple[dict[str, Predict], dict]:
    """name -> predictor for every trained model in the run (each on ``device``), plus the
    models themselves (and the trie, on ``device``)."""
    device = torch.device(device)
    trie = SidTrie.from_export(sid_dir).to(device)
    preds: dict[str, Predict] = {}
    models: dict = {"trie": trie, "device": device}

    run = RunLayout(Path(run_dir))

    def add(name: str, stage: str) -> None:
        _, model = load_stage_model(run.stage(stage).root, device)
        preds[name], models[name] = slate_predictor(model, trie, beam, rank), model

    def trained(stage: str) -> bool:
        return run.stage(stage).final_weights.is_file()

    if trained("orpo"):
        add("higr", "orpo")
        add("higr_no_align", "hsd")
    else:
        add("higr", "hsd")
    for name, stage in (("higr_dpo", "dpo"), ("flat", "flat"), ("sasrec", "sasrec")):
        if trained(stage):
            add(name, stage)
    return preds, models


def evaluate(preds: dict[str, Predict], etl_dir: Path, collate, item_emb: np.ndarray,
             batch_size: int, max_users: int, effective_threshold: float) -> dict[str, dict]:
    """One streaming pass over the test users, every model on every batch."""
    from tqdm import tqdm

    pop = popularity_top(etl_dir)
    acc = {name: SlateMetrics(effective_threshold, per_user=[]) for name in [*preds, "popularity"]}
    spent = dict.fromkeys(preds, 0.0)
    with torch.inference_mode(), tqdm(desc="eval", unit="user", total=max_users or None) as bar:
        for batch, _ in test_batches(etl_dir, collate, batch_size, max_users):
            tgt, fb = batch.target_items.numpy(), batch.target_fb.numpy()
            for name, fn in preds.items():
                t = time.perf_counter()
                acc[name].update(fn(batch), tgt, fb, item_emb)
                spent[name] += time.perf_counter() - t
            acc["popularity"].update(np.tile(pop, (tgt.shape[0], 1)), tgt, fb, item_emb)
            bar.update(tgt.shape[0])
    out = {name: a.result() for name, a in acc.items()}
    for name, sec in spent.items():
        out[name]["eval_seconds"] = round(sec, 2)
    head = acc["higr"].per_user
    for name, a in acc.items():
        if name != "higr":  # HiGR minus this model, the same users (paired bootstrap)
            out[name]["higr_minus_ndcg5"] = paired_bootstrap(head, a.per_user)
    return out


def time_decode(fn: Callable[[], object], repeats: int, budget_s: float = 0.0) -> dict:
    """Median/p99 of up to ``repeats`` timed calls after one warm-up; with ``budget_s`` > 0,
    stop early once that much time is spent (never below 3 calls), so a slow baseline cannot
    stall a report. The number of calls made is returned as ``repeats``."""
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
        if budget_s > 0 and len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    arr = np.array(times)
    return {"median_ms": float(np.median(arr)), "p99_ms": float(np.percentile(arr, 99)),
            "repeats": len(times)}


def decode_latency(models: dict, etl_dir: Path, collate, beam: int, rank: str,
                   batch_sizes: list[int],
                   repeats: int, budget_s: float = 0.0) -> dict:
    """Median/p99 latency and slates/s of HiGR vs flat decoding on the same users."""
    from higr_dist.decode.flat import flat_beam_decode
    from higr_dist.decode.hier import coarse_to_fine_decode

    trie = models["trie"]
    device = torch.device(models.get("device", "cpu"))
    out: dict = {"beam": beam, "by_batch": {}, "device": str(device)}

    def timed(decode, model, args) -> Callable[[], object]:
        def call() -> object:
            result = decode(model, *args, beam=beam, rank=rank)
            _sync(device)  # the kernels' time, not their launch time
            return result
        return call

    for bs in batch_sizes:
        batch, _ = next(test_batches(etl_dir, collate, bs, bs))
        n = batch.num_samples
        args = (batch.hist_codes.to(device), batch.hist_mask.to(device),
                batch.hist_fb.to(device), trie)
        row = {"higr": time_decode(timed(coarse_to_fine_decode, models["higr"], args), repeats,
                                   budget_s)}
        if "flat" in models:
            row["flat"] = time_decode(timed(flat_beam_decode, models["flat"], args), repeats,
                                      budget_s)
        for r in row.values():
            r["batch"] = n
            r["slates_per_s"] = n / (r["median_ms"] / 1000.0)
        if "flat" in row:
            row["speedup"] = row["flat"]["median_ms"] / row["higr"]["median_ms"]
        out["by_batch"][str(bs)] = row
    head = out["by_batch"][str(max(batch_sizes))]
    out.update({k: v for k, v in head.items()})
    return out


def item_ids(etl_dir: Path) -> np.ndarray:
    """item_idx -> source item_id (strings), from the ETL's item_index (catalogue-sized)."""
    import pyarrow.parquet as pq

    t = pq.read_table(EtlLayout(Path(etl_dir)).item_index, columns=["item_idx", "item_id"])
    idx = t.column("item_idx").to_numpy()
    ids = np.empty(idx.max() + 1, dtype=object)
    ids[idx] = t.column("item_id").to_pylist()
    return ids


def serving_samples(etl_dir: Path, users: set[str] | None = None) -> Iterator[dict]:
    """Each user's whole log as a serving context: the test sample's history followed by its
    held-out window (so the slate is "what to show next"), filtered to ``users`` when given."""
    for s in iterate_samples(list_shards(EtlLayout(Path(etl_dir)).kind("slates/test")),
                             FOLDERS["slates/test"]):
        if users is not None and str(s["user_id"]) not in users:
            continue
        yield dict(s, hist_items=[*s["hist_items"], *s["target_items"]],
                   hist_fb=[*s["hist_fb"], *s["target_fb"]])


def generate_slates(predict: Predict, etl_dir: Path, collate, num_users: int, out: Path,
                    batch_size: int = 64, users: set[str] | None = None) -> int:
    """Write one JSON line per user: user_id, item_ids (ranked), item_idx. The context is the
    user's whole log (:func:`serving_samples`); at most ``num_users`` users (0 = all)."""
    from tqdm import tqdm

    ids = item_ids(etl_dir)
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    total = len(users) if users is not None else (num_users or None)

    def flush(buf: list[dict], fh) -> int:
        items = predict(collate(buf))
        for smp, row in zip(buf, items):
            fh.write(json.dumps({"user_id": smp["user_id"], "item_ids": [ids[i] for i in row],
                                 "item_idx": [int(i) for i in row]}) + "\n")
        return len(buf)

    with open(out, "w") as fh, tqdm(total=total, desc="slates", unit="user") as bar:
        buf: list[dict] = []
        for smp in serving_samples(etl_dir, users):
            buf.append(smp)
            if len(buf) == batch_size or (num_users and n + len(buf) >= num_users):
                k = flush(buf, fh)
                n, buf = n + k, []
                bar.update(k)
                if num_users and n >= num_users:
                    break
        if buf:
            k = flush(buf, fh)
            n += k
            bar.update(k)
    return n


def evaluate_run(cfg, manifest: dict, summaries: dict) -> dict:
    """Everything after training for a pipeline run; returns the report dict."""
    _threads()
    run = RunLayout(Path(cfg.run_dir).resolve())  # the report names files wherever it is read
    etl_dir, sid_dir = run.etl.root, run.sids
    preds, models = make_predictors(run.root, sid_dir, cfg.eval.beam, cfg.eval.rank,
                                    resolve_device(cfg.eval.device))
    hcfg = models["higr"].cfg
    collate = SlateCollate(sid_dir, hcfg.N, hcfg.history_len)
    item_emb = np.load(sid_dir / "item_features.npy", mmap_mode="r")
    t = time.perf_counter()
    evals = evaluate(preds, etl_dir, collate, item_emb, cfg.eval.batch_size, cfg.eval.max_users,
                     cfg.eval.effective_threshold)
    eval_s = time.perf_counter() - t
    decode = decode_latency(models, etl_dir, collate, cfg.eval.beam, cfg.eval.rank,
                            list(cfg.eval.latency_batches),
                            cfg.eval.latency_repeats, cfg.eval.latency_budget_s)
    n_slates = generate_slates(preds["higr"], etl_dir, collate, cfg.eval.generate_users,
                               run.slates)
    sid_report = json.loads((sid_dir / "sid_report.json").read_text())
    return {
        "name": cfg.name,
        "etl": {k: manifest[k] for k in ("rows_in", "rows_out", "rows_quarantined",
                                         "quarantine_by_reason", "num_items", "num_users")
                if k in manifest},
        "tokenizer": {k: sid_report[k] for k in ("collision", "concentration", "consistency")},
        "eval": evals,
        "eval_seconds": round(eval_s, 1),
        "effective_threshold": cfg.eval.effective_threshold,
        "decode": decode,
        "slates": {"file": str(run.slates), "users": n_slates},
        "stages": {s: {k: v for k, v in (summ or {}).items() if not isinstance(v, dict | list)}
                   for s, summ in summaries.items()},
        "selection": {s: {"final_step": summ["final_step"], **summ["validation"]}
                      for s, summ in summaries.items() if (summ or {}).get("validation")},
        "tensorboard": str(run.root),
    }


# ---------------------------------------------------------------------------------------------
# CLIs
# ---------------------------------------------------------------------------------------------


def _load_pipeline(run_dir: Path):
    from higr_dist.config import load
    from higr_dist.run_config import PipelineConfig

    return load(PipelineConfig, RunLayout(run_dir).resolved_config)


def _run_folder_problem(run_dir: Path, need: tuple[Path, ...]) -> str | None:
    """Why ``run_dir`` is not a finished pipeline run folder with the files ``need`` in it
    (None: it is)."""
    if not run_dir.is_dir():
        return f"{run_dir} is not a folder"
    missing = [str(p.relative_to(run_dir)) for p in (RunLayout(run_dir).resolved_config, *need)
               if not p.is_file()]
    if missing:
        return (f"{run_dir} is not a finished pipeline run folder (no {', '.join(missing)}); "
                "run `higr run` first")
    return None


def _cli_errors(prog: str, setup: bool = True):
    """The user errors a CLI reports in one line (exit 2) instead of a traceback: a config,
    a missing or unreadable file, a corrupt shard; while setting up (``setup``) also any
    ValueError (a bad device, an untrained model, ...), which during the work itself would be
    a bug and keeps its traceback."""
    import contextlib

    from higr_dist.config import ConfigError
    from higr_dist.data.loader import ShardError

    user = (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError,
            ShardError, *((ValueError,) if setup else ()))

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except ConfigError as e:
            raise _CliError(f"{prog}: invalid config: {'; '.join(e.problems)}") from e
        except user as e:
            lines = str(e).strip().splitlines()
            raise _CliError(f"{prog}: {lines[0] if lines else type(e).__name__}") from e

    return guard()


def _read_json(path: Path):
    """A JSON file of the run folder; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from None


class _CliError(Exception):
    """A one-line user error of ``higr-eval`` / ``higr-generate``."""


def eval_main(argv: list[str] | None = None) -> int:
    """``higr-eval --run-dir runs/demo``: re-run evaluation and rewrite the run's report."""
    from higr_dist.eval.report import eval_table, write_report

    p = argparse.ArgumentParser(prog="higr-eval", description=eval_main.__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--device", default=None,
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default: the run's "
                        "eval.device)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    run = RunLayout(run_dir)
    try:
        problem = _run_folder_problem(run_dir, (run.etl.manifest, run.sids / "sid_report.json"))
        if problem:
            raise _CliError(f"higr-eval: {problem}")
        with _cli_errors("higr-eval"):
            cfg = _load_pipeline(run_dir)
            # the folder given, wherever the run was made (a moved run folder is the same run)
            cfg.out_root, cfg.name = str(run_dir.parent), run_dir.name
            if args.device is not None:
                cfg.eval.device = args.device
            resolve_device(cfg.eval.device)
            manifest = _read_json(run.etl.manifest)
            summaries = {s: _read_json(run.stage(s).summary)
                         for s in cfg.stages if run.stage(s).summary.is_file()}
            if "hsd" not in summaries:
                raise ValueError(f"{run.stage('hsd').root} has no {run.stage('hsd').summary.name}:"
                                 " the HSD stage has not finished; run `higr run` first")
        with _cli_errors("higr-eval", setup=False):
            report = evaluate_run(cfg, manifest, summaries)
    except _CliError as e:
        print(e, file=sys.stderr)
        return 2
    write_report(run_dir, report, {s: run.stage(s).tensorboard for s in summaries})
    print(eval_table(report["eval"]))
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """``higr-generate --run-dir runs/demo [--users users.txt | --num-users 20] --out slates.jsonl``.

    Slates for users of the run's data, from each user's whole log (history and held-out window);
    ``--users`` is a file with one user_id per line."""
    p = argparse.ArgumentParser(prog="higr-generate", description=generate_main.__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--num-users", type=int, default=100, help="users to generate for (0 = all)")
    p.add_argument("--users", default=None, help="file with one user_id per line")
    p.add_argument("--model", default="higr", choices=["higr", "higr_no_align", "flat", "sasrec"])
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--rank", default="mass", choices=list(RANKS),
                   help="slate ranking of the SID decoders (higr_dist.decode.hier.RANKS)")
    p.add_argument("--out", default=None, help="output JSONL (default <run-dir>/slates.jsonl)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.num_users < 0:
        p.error(f"--num-users must be >= 0 (0 = all), got {args.num_users}")
    if args.beam < 1:
        p.error(f"--beam must be >= 1, got {args.beam}")
    run_dir = Path(args.run_dir)
    run = RunLayout(run_dir)
    try:
        with _cli_errors("higr-generate"):  # the arguments first, before any file is read
            device = resolve_device(args.device)
        problem = _run_folder_problem(run_dir, (run.sids / "sid_table.npy",
                                                run.stage("hsd").final_weights))
        if problem:
            raise _CliError(f"higr-generate: {problem}")
        with _cli_errors("higr-generate"):
            users = None
            if args.users:
                users = {ln.strip() for ln in Path(args.users).read_text().splitlines()
                         if ln.strip()}
            out = Path(args.out) if args.out else run.slates
            if out.is_dir():
                raise IsADirectoryError(f"--out {out} is a folder; give a file name")
            _threads()
            sid_dir = run.sids
            preds, models = make_predictors(run_dir, sid_dir, args.beam, args.rank, device)
            if args.model not in preds:
                raise ValueError(f"model {args.model!r} was not trained in {run_dir}")
        with _cli_errors("higr-generate", setup=False):
            hcfg = models["higr"].cfg
            n = generate_slates(preds[args.model], run.etl.root,
                                SlateCollate(sid_dir, hcfg.N, hcfg.history_len),
                                args.num_users if users is None else 0, out, users=users)
    except _CliError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"wrote {n} slates to {out}")
    if users is not None and n < len(users):
        print(f"higr-generate: {len(users) - n} of {len(users)} requested users are not in "
              f"{run.etl.root}", file=sys.stderr)
    return 0
