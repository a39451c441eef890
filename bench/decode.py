"""Decoding latency: HiGR coarse-to-fine vs flat beam search at the same model size.

    python bench/decode.py                                   # 25m preset, batches 1 and 64
    python bench/decode.py --preset tiny --repeats 50        # quick
    python bench/decode.py --run-dir runs/demo               # + Recall@5 of trained models

Design
------
- Models: ``HSD(cfg)`` and ``Flat(cfg)`` from one :class:`~higr_dist.models.hsd.HSDConfig`
  (same width d_model, same total decoder depth planner_layers + gen_layers, same context
  encoder), random weights (latency does not depend on the weights: both decoders run a fixed
  number of steps), eval mode, ``--dtype`` fp32 or bf16, ``--device`` cpu or cuda.
- Catalogue: ``--num-items`` random unique SIDs of K^L (default 10,000 of 256^3); histories
  of ``--history`` items with ~10% padding. Both decoders get the same trie and the same users.
- Timing: per batch size, ``--warmup`` untimed calls, then ``--repeats`` timed calls of the
  whole decode (context encoding included, CUDA synchronised); median and p99 latency and
  slates/s = batch / median. Speedup = flat median / HiGR median. The context encoding alone
  (history encoder + cross-attention keys/values of every decoder block; the same work for
  both models) is timed too, and ``speedup_decode_only`` compares the decoders without it.
- Quality (``--run-dir``): :func:`slate_metrics` decodes the same test users with each trained
  model and scores them with :class:`higr_dist.eval.metrics.SlateMetrics` (Recall@5 etc.);
  :func:`load_run` reads the run layout of DESIGN.md (``<run>/<stage>/resolved_config.yaml``,
  ``final/model_fp32.pt``, ``<run>/tokenizer/export``, ``<run>/etl/slates/test``).
- Output: a table on stdout and a JSON file (``--out``).
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
    """Matmul FLOPs per slate of each decoder's steps (context encoding excluded)."""
    x = block_param_count(cfg.block(True)) - 2 * cfg.d_model ** 2  # no memory projection
    steps = cfg.N * cfg.L
    higr = 2 * (cfg.N * cfg.planner_layers * x + steps * beam * cfg.gen_layers * x
                + steps * beam * cfg.K * cfg.d_model)
    flat = 2 * steps * beam * ((cfg.planner_layers + cfg.gen_layers) * x + cfg.K * cfg.d_model)
    return {"higr": float(higr), "flat": float(flat), "ratio": flat / higr}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
              ) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_decoder(decode: Decoder, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 trie: SidTrie, beam: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median/p99 latency (ms) and slates/s of ``decode(model, *inputs, trie, beam=beam)``,
    plus the median of the context encoding alone (``encode_ms``, included in the latency)."""
    device = inputs[0].device
    trie = trie.to(device)
    times = time_call(lambda: decode(model, *inputs, trie, beam=beam), device, repeats, warmup)
    with torch.inference_mode():
        enc = time_call(lambda: model.encode_context(*inputs), device, repeats, warmup)
    med = statistics.median(times)
    B = inputs[0].shape[0]
    return {"batch": B, "median_ms": med * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3,
            "slates_per_s": B / med, "encode_ms": statistics.median(enc) * 1e3,
            "repeats": repeats}


def compare_latency(models: dict[str, nn.Module], table: np.ndarray, batch_sizes: Iterable[int],
                    history: int, beam: int, repeats: int, warmup: int,
                    device: torch.device) -> dict:
    """Time every model on the same users per batch size; ``models`` keys are DECODERS keys."""
    trie = SidTrie.from_table(table, models["higr"].cfg.K).to(device)
    out: dict = {}
    for B in batch_sizes:
        inputs = tuple(t.to(device) for t in random_histories(table, B, history, seed=B))
        row = {name: time_decoder(DECODERS[name], m, inputs, trie, beam, repeats, warmup)
               for name, m in models.items()}
        if "higr" in row and "flat" in row:
            h, f = row["higr"], row["flat"]
            row["speedup"] = f["median_ms"] / h["median_ms"]
            row["speedup_decode_only"] = ((f["median_ms"] - f["encode_ms"])
                                          / (h["median_ms"] - h["encode_ms"]))
        out[str(B)] = row
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


def load_run(run_dir: str | Path, batch_size: int, max_users: int = 0
             ) -> tuple[dict[str, tuple[nn.Module, Decoder]], list, SidTrie, np.ndarray | None]:
    """Trained HiGR (orpo if present, else hsd) and flat models of a pipeline run, the test
    users as SlateBatches, the trie and item embeddings."""
    import yaml

    from higr_dist.config import from_dict
    from higr_dist.data.loader import iterate_samples
    from higr_dist.data.shardio import list_shards
    from higr_dist.data.sids import load_sid_meta, load_sid_table
    from higr_dist.schema import SLATE
    from higr_dist.stages.hsd import SlateCollate

    run = Path(run_dir)
    sid_dir = run / "tokenizer" / "export"
    meta = load_sid_meta(sid_dir)
    trie = SidTrie.from_table(np.asarray(load_sid_table(sid_dir)), meta.K)
    models: dict[str, tuple[nn.Module, Decoder]] = {}
    cfg = None
    for name, stage, cls in (("higr", "orpo", HSD), ("higr", "hsd", HSD), ("flat", "flat", Flat)):
        weights = run / stage / "final" / "model_fp32.pt"
        if name in models or not weights.is_file():
            continue
        resolved = yaml.safe_load((run / stage / "resolved_config.yaml").read_text())
        cfg = from_dict(HSDConfig, resolved["model"])
        model = cls(cfg)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        models[name] = (model.eval(), DECODERS[name])
    if cfg is None:
        raise FileNotFoundError(f"no trained hsd/orpo/flat model under {run}")
    collate = SlateCollate(sid_dir, cfg.N, cfg.history_len)
    samples = list(iterate_samples(list_shards(run / "etl" / "slates" / "test"), SLATE))
    if max_users:
        samples = samples[:max_users]
    batches = [collate(samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)]
    emb_path = sid_dir / "item_emb.npy"
    item_emb = np.load(emb_path) if emb_path.is_file() else None
    return models, batches, trie, item_emb


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="25m", help="HSD preset (tiny, 25m, 100m, 0.05b ..)")
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


def latency_table(latency: dict) -> str:
    lines = ["| decoder | batch | median ms | p99 ms | slates/s | of which context encoding ms |",
             "|---|---|---|---|---|---|"]
    for B, row in latency.items():
        for name in DECODERS:
            if name in row:
                r = row[name]
                lines.append(f"| {name} | {B} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                             f"{r['slates_per_s']:.1f} | {r['encode_ms']:.2f} |")
        if "speedup" in row:
            lines.append(f"| speedup flat/higr | {B} | {row['speedup']:.2f}x | | | decode only: "
                         f"{row['speedup_decode_only']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = bench_config(args)
    torch.manual_seed(args.seed)
    models = {"higr": HSD(cfg), "flat": Flat(cfg)}
    models = {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}
    table = random_sid_table(args.num_items, cfg.K, cfg.L, args.seed)
    print(f"HSD {param_count(cfg) / 1e6:.1f}M params vs flat {flat_param_count(cfg) / 1e6:.1f}M; "
          f"d_model {cfg.d_model}, depth {cfg.planner_layers}+{cfg.gen_layers}; "
          f"{args.num_items} items, K={cfg.K}, L={cfg.L}, N={cfg.N}, beam {args.beam}; "
          f"{device} {args.dtype}, {torch.get_num_threads()} threads", flush=True)
    latency = compare_latency(models, table, args.batches, args.history, args.beam, args.repeats,
                              args.warmup, device)
    result = {
        "config": asdict(cfg), "beam": args.beam, "num_items": args.num_items,
        "history": args.history, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "params": {"higr": param_count(cfg), "flat": flat_param_count(cfg)},
        "decode_flops_per_slate": decode_flops(cfg, args.beam),
        "latency": latency,
    }
    print(latency_table(latency))
    if args.run_dir:
        run_models, batches, trie, item_emb = load_run(args.run_dir, max(args.batches),
                                                       args.max_users)
        run_models = {k: (m.to(device), d) for k, (m, d) in run_models.items()}
        result["quality"] = slate_metrics(run_models, batches, trie, args.beam,
                                          item_emb=item_emb)
        for name, r in result["quality"].items():
            print(f"{name}: recall@5 {r['impressions']['recall5']:.4f} "
                  f"(users {r['users']}), eff. NDCG@5 {r['effective']['ndcg5']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
