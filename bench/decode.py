"""Decoding latency: HiGR coarse-to-fine vs flat beam search at the same model size.

    python bench/decode.py --threads 1                       # 25m preset, batches 1 and 64
    python bench/decode.py --preset tiny --repeats 50        # quick
    python bench/decode.py --run-dir runs/demo --threads 1   # + the trained models: latency
                                                             #   on real users, Recall@5, NDCG@5

Design
------
- Models: ``HSD(cfg)`` and ``Flat(cfg)`` from one :class:`~higr_dist.models.hsd.HSDConfig`
  (same width d_model, same total decoder depth planner_layers + gen_layers, same context
  encoder), random weights (latency does not depend on the weights: both decoders run a fixed
  number of steps), eval mode, ``--dtype`` fp32 or bf16, ``--device`` cpu or cuda.
- Catalogue: ``--num-items`` random unique SIDs of K^L (default 10,000 of 256^3); histories
  of ``--history`` items with ~10% padding. Both decoders get the same trie and the same users.
- Timing (:func:`time_models`): per batch size, ``--warmup`` untimed calls, then ``--repeats``
  rounds that time one call of every decoder each, interleaved, so load from other processes
  on a shared machine hits both alike. Each call is the whole decode (context encoding
  included, CUDA synchronised). Reported: median and p99 wall latency, slates/s = batch /
  median, and on CPU the median *process CPU time* of a call (``cpu_ms``: robust to other
  processes' load when the process runs one thread, ``--threads 1``). Speedups = flat / HiGR
  of the medians (wall and CPU). The context encoding alone (history encoder + every decoder
  block's cross-attention memory; the same encoder in both models) is timed too, and
  ``speedup_decode_only`` compares the decoders without it.
- Quality and trained latency (``--run-dir``): :func:`load_run` reads a run folder through
  ``higr_dist.layout`` (each stage's exported weights and model card, the tokenizer's export,
  the test split): HiGR after pretraining (``higr``,
  stage hsd), after ORPO (``higr_orpo``) and flat. :func:`time_models` times HiGR vs flat on
  the first 1 / 64 test users; :func:`slate_metrics` decodes the same test users with every
  model and scores them with :class:`higr_dist.eval.metrics.SlateMetrics` (Recall@5, NDCG@5..).
- Output: tables on stdout and a JSON file (``--out``) with the machine, threads and load
  average (``os.getloadavg``) before and after.

On a CPU shared with other jobs use ``--threads 1``: with several OpenMP threads per process
on oversubscribed cores, every parallel region waits for a descheduled thread and latencies
inflate 10-40x (seen on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higr_dist.decode.flat import flat_beam_decode  # noqa: E402
from higr_dist.decode.hier import DecodeResult, coarse_to_fine_decode  # noqa: E402
from higr_dist.decode.trie import SidTrie  # noqa: E402
from higr_dist.models.flat import Flat, flat_param_count  # noqa: E402
from higr_dist.models.hsd import HSD, HSDConfig, param_count, preset  # noqa: E402
from higr_dist.models.layers import block_param_count  # noqa: E402

Decoder = Callable[..., DecodeResult]
DECODERS: dict[str, Decoder] = {"higr": coarse_to_fine_decode, "flat": flat_beam_decode}


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def random_sid_table(num_items: int, K: int, L: int, seed: int = 0) -> np.ndarray:
    """``num_items`` distinct random SIDs: int64 [num_items, L]."""
    if num_items > K ** L:
        raise ValueError(f"{num_items} items do not fit {K}^{L} SIDs")
    keys = np.random.default_rng(seed).choice(K ** L, num_items, replace=False)
    return np.stack([(keys // K ** (L - 1 - i)) % K for i in range(L)], 1).astype(np.int64)


def random_histories(table: np.ndarray, B: int, H: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hist_codes [B, H, L], hist_mask [B, H] right-padded, hist_fb [B, H])."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, table.shape[0], (B, H), generator=g)
    lengths = torch.randint(max(1, int(0.8 * H)), H + 1, (B,), generator=g)
    mask = torch.arange(H)[None, :] < lengths[:, None]
    fb = torch.rand(B, H, generator=g) * 3 * mask
    return torch.from_numpy(table)[items] * mask[..., None], mask, fb


def decode_flops(cfg: HSDConfig, beam: int) -> dict[str, float]:
    """Matmul FLOPs per slate of each decoder's steps (context encoding and cross-attention
    memory excluded): rows per step follow the beam (one row before the first expansion)."""
    x = block_param_count(cfg.block(True)) - 2 * cfg.d_model ** 2  # no memory projection
    head = cfg.K * cfg.d_model
    gen_rows = cfg.N * (1 + (cfg.L - 1) * beam)  # per item: P_j row, then beam rows
    flat_rows = 1 + (cfg.N * cfg.L - 1) * beam
    higr = 2 * (cfg.N * cfg.planner_layers * x + gen_rows * (cfg.gen_layers * x + head))
    flat = 2 * flat_rows * ((cfg.planner_layers + cfg.gen_layers) * x + head)
    return {"higr": float(higr), "flat": float(flat), "ratio": flat / higr}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w, time.process_time() - c


def _summary(wall: list[float], cpu: list[float], B: int) -> dict[str, float]:
    med = statistics.median(wall)
    return {"batch": B, "median_ms": med * 1e3, "p99_ms": float(np.percentile(wall, 99)) * 1e3,
            "cpu_ms": statistics.median(cpu) * 1e3, "slates_per_s": B / med,
            "repeats": len(wall)}


def time_models(models: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], trie: SidTrie,
                beam: int, repeats: int, warmup: int) -> dict:
    """Interleaved timing of ``DECODERS[name](model, *inputs, trie, beam=beam)`` for every
    ``name -> model`` (keys must be DECODERS keys), plus each model's context encoding alone.
    Returns name -> summary (median/p99 wall ms, median CPU ms, slates/s, ``encode_ms``) and,
    with both ``higr`` and ``flat``, the speedups (flat / HiGR)."""
    device = inputs[0].device
    trie = trie.to(device)
    B = inputs[0].shape[0]
    calls = {name: (lambda m=m, d=DECODERS[name]: d(m, *inputs, trie, beam=beam))
             for name, m in models.items()}
    encs = {name: (lambda m=m: m.encode_context(*inputs, beam=beam)) for name, m in models.items()}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    enc = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(repeats):
            for name in models:
                w, c = _timed(calls[name], device)
                wall[name].append(w)
                cpu[name].append(c)
                enc[name].append(_timed(encs[name], device)[0])
    row: dict = {name: {**_summary(wall[name], cpu[name], B),
                        "encode_ms": statistics.median(enc[name]) * 1e3} for name in models}
    if "higr" in row and "flat" in row:
        h, f = row["higr"], row["flat"]
        row["speedup"] = f["median_ms"] / h["median_ms"]
        row["speedup_cpu"] = f["cpu_ms"] / h["cpu_ms"]
        row["speedup_decode_only"] = ((f["median_ms"] - f["encode_ms"])
                                      / (h["median_ms"] - h["encode_ms"]))
    return row


def compare_latency(models: dict[str, nn.Module], table: np.ndarray, batch_sizes: Iterable[int],
                    history: int, beam: int, repeats: int, warmup: int,
                    device: torch.device) -> dict:
    """:func:`time_models` on random users per batch size (same users for every model)."""
    trie = SidTrie.from_table(table, models["higr"].cfg.K).to(device)
    out: dict = {}
    for B in batch_sizes:
        inputs = tuple(t.to(device) for t in random_histories(table, B, history, seed=B))
        out[str(B)] = time_models(models, inputs, trie, beam, repeats, warmup)
        print(latency_table({str(B): out[str(B)]}, header=False), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# quality on a trained run
# ---------------------------------------------------------------------------------------------


def slate_metrics(models: dict[str, tuple[nn.Module, Decoder]], batches: Iterable,
                  trie: SidTrie, beam: int, effective_threshold: float = 2.0,
                  item_emb: np.ndarray | None = None) -> dict[str, dict]:
    """Decode the same users with every model and score them: ``batches`` yields objects with
    hist_codes, hist_mask, hist_fb, target_items, target_fb (e.g. ``SlateBatch``). Returns
    name -> ``SlateMetrics.result()`` (impressions/effective hit@5, recall@5, NDCG@5, ILD)."""
    from higr_dist.eval.metrics import SlateMetrics

    acc = {name: SlateMetrics(effective_threshold=effective_threshold) for name in models}
    for batch in batches:
        for name, (model, decode) in models.items():
            device = next(model.parameters()).device
            res = decode(model, batch.hist_codes.to(device), batch.hist_mask.to(device),
                         batch.hist_fb.to(device), trie.to(device), beam=beam)
            acc[name].update(res.items.cpu().numpy(), batch.target_items.numpy(),
                             batch.target_fb.numpy(), item_emb)
    return {name: a.result() for name, a in acc.items()}


RUN_MODELS = (("higr", "hsd", "higr"), ("higr_orpo", "orpo", "higr"), ("flat", "flat", "flat"))
"""(name, stage, decoder) of the trained models :func:`load_run` looks for."""


def load_run(run_dir: str | Path, batch_size: int, max_users: int = 0
             ) -> tuple[dict[str, tuple[nn.Module, Decoder]], list, SidTrie, np.ndarray | None]:
    """Every trained model of a pipeline run (:data:`RUN_MODELS`, those present), the test users
    as SlateBatches of ``batch_size``, the trie and the item embeddings (for ILD)."""
    from higr_dist.data.loader import iterate_samples
    from higr_dist.data.shardio import list_shards
    from higr_dist.data.slates import SlateCollate
    from higr_dist.decode.trie import SidTrie
    from higr_dist.eval.harness import load_stage_model
    from higr_dist.layout import RunLayout
    from higr_dist.schema import FOLDERS

    run = Path(run_dir)
    layout = RunLayout(run)
    sid_dir = layout.sids
    trie = SidTrie.from_export(sid_dir)
    models: dict[str, tuple[nn.Module, Decoder]] = {}
    cfg = None
    for name, stage, decoder in RUN_MODELS:
        if not layout.stage(stage).final_weights.is_file():
            continue
        _, model = load_stage_model(layout.stage(stage).root)  # eval mode
        cfg = model.cfg
        models[name] = (model, DECODERS[decoder])
    if cfg is None:
        raise FileNotFoundError(f"no trained hsd/orpo/flat model under {run}")
    collate = SlateCollate(sid_dir, cfg.N, cfg.history_len)
    samples = list(iterate_samples(list_shards(layout.etl.kind("slates/test")),
                                   FOLDERS["slates/test"]))
    if max_users:
        samples = samples[:max_users]
    batches = [collate(samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)]
    emb_path = sid_dir / "item_features.npy"  # ILD in the ETL's feature space, as the harness
    item_emb = np.load(emb_path) if emb_path.is_file() else None
    return models, batches, trie, item_emb


def run_latency(models: dict[str, tuple[nn.Module, Decoder]], batches: list, trie: SidTrie,
                batch_sizes: Iterable[int], beam: int, repeats: int, warmup: int,
                device: torch.device) -> dict:
    """HiGR (pretrained) vs flat latency of trained models on the first B test users."""
    timed = {k: models[k][0].to(device) for k in ("higr", "flat") if k in models}
    out: dict = {}
    for B in batch_sizes:
        users = [b for b in batches if b.num_samples >= B]
        if not users:
            continue
        b = users[0]
        inputs = tuple(t[:B].to(device) for t in (b.hist_codes, b.hist_mask, b.hist_fb))
        out[str(B)] = time_models(timed, inputs, trie, beam, repeats, warmup)
        print(latency_table({str(B): out[str(B)]}, header=False), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="25m",
                   help="HSD preset for the random-weight latency (tiny, 25m, 100m, 0.05b ..; "
                        "none = only --run-dir)")
    p.add_argument("--d-model", type=int, default=0, help="override the preset's width")
    p.add_argument("--planner-layers", type=int, default=0)
    p.add_argument("--gen-layers", type=int, default=0)
    p.add_argument("--K", type=int, default=256)
    p.add_argument("--L", type=int, default=3)
    p.add_argument("--N", type=int, default=5)
    p.add_argument("--num-items", type=int, default=10_000)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--run-dir", default="", help="trained pipeline run: also Recall@5")
    p.add_argument("--max-users", type=int, default=0, help="test users for --run-dir (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/decode.json")
    return p.parse_args(argv)


def bench_config(args: argparse.Namespace) -> HSDConfig:
    cfg = replace(preset(args.preset), K=args.K, L=args.L, N=args.N,
                  history_len=max(args.history, 1), dropout=0.0)
    if args.d_model:
        cfg = replace(cfg, d_model=args.d_model)
    if args.planner_layers:
        cfg = replace(cfg, planner_layers=args.planner_layers)
    if args.gen_layers:
        cfg = replace(cfg, gen_layers=args.gen_layers)
    problems = cfg.validate()
    if problems:
        raise SystemExit("bad model config: " + "; ".join(problems))
    return cfg


TABLE_HEAD = ["| decoder | batch | median ms | p99 ms | CPU ms | slates/s | of which context "
              "encoding ms |", "|---|---|---|---|---|---|---|"]


def latency_table(latency: dict, header: bool = True) -> str:
    lines = list(TABLE_HEAD) if header else []
    for B, row in latency.items():
        for name in DECODERS:
            if name in row:
                r = row[name]
                lines.append(f"| {name} | {B} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                             f"{r['cpu_ms']:.2f} | {r['slates_per_s']:.1f} | "
                             f"{r['encode_ms']:.2f} |")
        if "speedup" in row:
            lines.append(f"| **speedup flat/higr** | {B} | **{row['speedup']:.2f}x** | | "
                         f"**{row['speedup_cpu']:.2f}x** | | decode only: "
                         f"{row['speedup_decode_only']:.2f}x |")
    return "\n".join(lines)


def quality_table(quality: dict) -> str:
    lines = ["| model | users | impressions Recall@5 | hit@5 | effective Recall@5 | "
             "effective NDCG@5 | ILD |", "|---|---|---|---|---|---|---|"]
    for name, r in quality.items():
        lines.append(f"| {name} | {r['users']} | {r['impressions']['recall5']:.4f} | "
                     f"{r['impressions']['hit5']:.4f} | {r['effective']['recall5']:.4f} | "
                     f"{r['effective']['ndcg5']:.4f} | {r['ild']:.4f} |")
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result: dict = {"beam": args.beam, "dtype": args.dtype, **machine(device),
                    "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                    "loadavg_before": os.getloadavg()}
    if args.preset != "none":
        cfg = bench_config(args)
        torch.manual_seed(args.seed)
        models = {"higr": HSD(cfg), "flat": Flat(cfg)}
        models = {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}
        table = random_sid_table(args.num_items, cfg.K, cfg.L, args.seed)
        print(f"HSD {param_count(cfg) / 1e6:.1f}M params vs flat "
              f"{flat_param_count(cfg) / 1e6:.1f}M; d_model {cfg.d_model}, depth "
              f"{cfg.planner_layers}+{cfg.gen_layers}; {args.num_items} items, K={cfg.K}, "
              f"L={cfg.L}, N={cfg.N}, beam {args.beam}; {device} {args.dtype}, "
              f"{torch.get_num_threads()} threads", flush=True)
        print("\n".join(TABLE_HEAD), flush=True)
        result["random"] = {
            "preset": args.preset, "config": asdict(cfg), "num_items": args.num_items,
            "history": args.history,
            "params": {"higr": param_count(cfg), "flat": flat_param_count(cfg)},
            "decode_flops_per_slate": decode_flops(cfg, args.beam),
            "latency": compare_latency(models, table, args.batches, args.history, args.beam,
                                       args.repeats, args.warmup, device)}
    if args.run_dir:
        run_models, batches, trie, item_emb = load_run(args.run_dir, max(args.batches),
                                                       args.max_users)
        run_models = {k: (m.to(device), d) for k, (m, d) in run_models.items()}
        cfg = run_models["higr" if "higr" in run_models else next(iter(run_models))][0].cfg
        print(f"trained run {args.run_dir}: {', '.join(run_models)}; d_model {cfg.d_model}, "
              f"depth {cfg.planner_layers}+{cfg.gen_layers}, K={cfg.K}, {trie.num_items} items",
              flush=True)
        print("\n".join(TABLE_HEAD), flush=True)
        trained: dict = {
            "run_dir": str(args.run_dir), "config": asdict(cfg), "num_items": trie.num_items,
            "params": {"higr": param_count(cfg), "flat": flat_param_count(cfg)},
            "decode_flops_per_slate": decode_flops(cfg, args.beam),
            "latency": run_latency(run_models, batches, trie, args.batches, args.beam,
                                   args.repeats, args.warmup, device)}
        t0 = time.perf_counter()
        trained["quality"] = slate_metrics(run_models, batches, trie, args.beam,
                                           item_emb=item_emb)
        trained["quality_seconds"] = time.perf_counter() - t0
        print(quality_table(trained["quality"]))
        result["trained"] = trained
    result["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
