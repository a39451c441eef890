"""Paper Table 2 on real items: RQ-KMeans vs RQ-VAE vs PCRQ-VAE on KuaiRec's 10,728 videos
(or on any ETL output folder, e.g. the synthetic generator's).

    python bench/tokenizer_kuairec.py --kuairec-dir /path/to/kuairec \
        --out bench/results/tokenizer_kuairec.json --jobs 2 --threads 1
    python bench/tokenizer_kuairec.py --etl-dir /path/to/etl_out \
        --out bench/results/tokenizer_synthetic.json --jobs 2 --threads 1

Design
------
- Input, KuaiRec mode (``--kuairec-dir``): ``kuairec_caption_category.csv[.zst]`` +
  ``item_categories.csv[.zst]`` read with ``bench/kuairec_items.py``'s ``read_items``;
  item_idx = item_id sorted as a string (the ETL's convention). Tokenizer input
  ``x = [text | tags]``: the cover-text/caption/topic-tag LSA embedding of
  ``bench/text_features.py`` (``--text-dim``) and the multi-hot of the item's
  ``item_categories.csv`` tag ids, each L2-normalised (the ITEM schema's "concat of normalised
  parts"). The caption file's category levels are *not* in x: they are what the SIDs are
  evaluated against (level 1 headline, level 2 alongside). Positives: each item's ``--top-p``
  cosine neighbours in x (``--pair-space text``: in the caption embedding only), plus co-watch
  pairs (same user, watch_ratio >= 2) from ``small_subset_watch_ratio.csv[.zst]`` when present
  (``--no-cowatch`` to skip); items without a pair get a weight-0 self pair, as the ETL writes.
- Input, ETL mode (``--etl-dir``, docs/DESIGN.md): x from ``items/`` shards, positives exactly
  as the ETL wrote them in ``pairs/`` (co-occurrence partners), the item's first category id
  as level 1 and its second (synthetic ``top|sub``) as level 2.
- Training: a torch loop around the shipped stage's ``step()`` (``higr_dist.stages.tokenizer``:
  model forward over ``[anchors; positives]``, eq. 4 loss, k-means init on the first batch,
  dead-code restarts), AdamW with a linear warm-up. Every trained method gets the same budget
  (steps, batch, lr, widths, K, L) and the same batch sequence (one generator per seed).
  RQ-KMeans is fitted by ``higr_dist.tokenizer.rq_kmeans.RQKMeans`` on x (no training).
  ``--jobs N`` runs N (method, seed) jobs at once in spawned processes of ``--threads``
  threads: on 2 cores, 2 x 1 thread beats 1 x 2 threads for these small matrices.
- PCRQ-VAE-only settings (the baselines never see them): ``lambda_c`` 0.03 and the cumulative
  ``prefix`` view were picked by a sweep on KuaiRec (docs/RESULTS.md,
  bench/results/tokenizer_kuairec_sweep.json); tau stays at the paper's 0.1.
- Metrics: ``higr_dist.tokenizer.metrics.sid_report`` on the codes *before* collision
  resolution (collision, concentration and consistency at prefix 1 = headline, all prefixes,
  usage/perplexity per layer), the same against the level-2 category, the duplicate-input
  floor (items whose x equals another item's x: no tokenizer can separate them), collisions
  beyond that floor, the share of positive pairs sharing the layer-1 code / 2-prefix, the
  collision resolution outcome, the last-100-step loss terms and the wall time.

Methods: ``rq_kmeans``, ``rq_vae``, ``pcrq_vae_nocon`` (global quantisation loss, no
contrastive term: isolates eq. 2 from eq. 3), ``pcrq_vae_prefix1`` / ``prefix2`` / ``prefix3``
(contrastive on layers {1}, {1,2}, {1,2,3}). With ``--seeds S > 1`` every number is the mean
over seeds (``<key>_std`` the standard deviation, ``per_seed`` the raw values). The JSON is
keyed by method, plus ``meta`` (config, data statistics, the issue's acceptance checks, paper
Table 2, machine, load average at start and end, total wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kuairec_items import read_items  # noqa: E402
from text_features import (  # noqa: E402
    Pairs,
    TextEmbedder,
    TextFeatureConfig,
    complete_pairs,
    cowatch_pairs,
    l2_normalise,
    merge_pairs,
    semantic_neighbours,
)

from higr_dist.models.pcrq_vae import PCRQVAE, PCRQVAEConfig, PCRQVAELossConfig  # noqa: E402
from higr_dist.stages.base import StageInputs  # noqa: E402
from higr_dist.stages.tokenizer import PairBatch, TokenizerStage  # noqa: E402
from higr_dist.tokenizer.export import (  # noqa: E402
    CollisionError,
    encode_items,
    resolve_collisions,
)
from higr_dist.tokenizer.metrics import colliding_mask, sid_report  # noqa: E402
from higr_dist.tokenizer.rq_kmeans import RQKMeans, RQKMeansConfig, tensor_chunks  # noqa: E402

METHODS: dict[str, dict] = {
    "rq_kmeans": {"mode": "rq_kmeans"},
    "rq_vae": {"mode": "rq_vae"},
    "pcrq_vae_nocon": {"mode": "pcrq_vae", "contrastive_layers": []},
    "pcrq_vae_prefix1": {"mode": "pcrq_vae", "contrastive_layers": [1]},
    "pcrq_vae_prefix2": {"mode": "pcrq_vae", "contrastive_layers": [1, 2]},
    "pcrq_vae_prefix3": {"mode": "pcrq_vae", "contrastive_layers": [1, 2, 3]},
}
"""Method name -> PCRQVAEConfig overrides (everything else is shared)."""

PAPER_TABLE2 = {
    "rq_kmeans": {"collision": 0.2126, "concentration": None, "consistency": 0.4533},
    "rq_vae": {"collision": 0.0298, "concentration": 0.75, "consistency": 0.5577},
    "pcrq_vae_prefix2": {"collision": 0.0237, "concentration": 0.93, "consistency": 0.6647},
}
"""Paper Table 2 (industrial data; METHOD.md), for the printed comparison."""


@dataclass
class BenchConfig:
    """Shared hyper-parameters: identical for every method."""

    K: int = 256
    """Codebook size per layer (METHOD.md: 256 for 1e4-1e5 items; TIGER used 256 x 3 on
    Amazon Beauty's 12k items)."""
    L: int = 3
    """Codes per item (paper: 3)."""
    steps: int = 3000
    """Optimizer steps per trained method."""
    batch_size: int = 512
    """Pairs per step (the model sees 2 x batch_size rows)."""
    lr: float = 1e-3
    """AdamW learning rate (constant after a linear warm-up of ``warmup`` steps)."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    """Encoder widths (decoder mirrors)."""
    latent_dim: int = 32
    """Quantised latent size d."""
    lambda_c: float = 0.03
    """Contrastive weight (eq. 4; paper 0.1). PCRQ-VAE only. 0.03: best consistency of the sweep
    {0.03, 0.1, 0.3, 1.0} on KuaiRec (docs/RESULTS.md); larger weights
    lowered consistency."""
    tau: float = 0.1
    """InfoNCE temperature (paper 0.1). PCRQ-VAE only."""
    contrastive_target: str = "prefix"
    """q^l of eq. 3 (``codeword`` or ``prefix``). PCRQ-VAE only. ``prefix`` (e^1+..+e^l):
    with ``codeword`` the layer >= 2 views are short residual codewords, the cosine's 1/|q|
    gradient blows up and layer 1 collapsed (collision 0.56-0.75) at every weight tried."""
    kmeans_iters: int = 20
    """Lloyd iterations (codebook init; RQ-KMeans passes)."""
    restart_every: int = 50
    """Dead-code restart window (training forwards)."""
    codebook_init: str = "first_batch"
    """``first_batch``: the stage's own k-means initialisation from the first training batch's
    anchors; ``catalogue``: :meth:`PCRQVAE.init_codebooks` on every item before step 1."""
    text_dim: int = 64
    """LSA embedding size of the caption text."""
    top_p: int = 5
    """Semantic neighbours per item (positives)."""
    pair_space: str = "content"
    """Where semantic neighbours are searched: ``content`` = the tokenizer input x (caption
    LSA + tags), ``text`` = the caption LSA embedding alone."""
    cowatch_top_p: int = 5
    """Co-watch partners per item (positives; when the subset file is present)."""
    cowatch: bool = True
    """Use co-watch pairs when ``small_subset_watch_ratio.csv[.zst]`` is present."""
    tag_features: bool = True
    """Append the ``item_categories.csv`` tag multi-hot to x."""
    seeds: int = 1
    """Seeds per method (model init, batch order, k-means); numbers are means over seeds."""
    seed: int = 0
    """First seed (seeds are seed, seed+1, ...)."""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def find_file(kuairec_dir: Path, stem: str, required: bool = True) -> Path | None:
    """``<dir>/<stem>`` or ``<dir>/<stem>.zst``."""
    for name in (stem, stem + ".zst"):
        if (kuairec_dir / name).is_file():
            return kuairec_dir / name
    if required:
        raise FileNotFoundError(f"neither {stem} nor {stem}.zst in {kuairec_dir}")
    return None


@dataclass
class BenchData:
    x: np.ndarray
    """float32 [N, D] tokenizer input."""
    text: np.ndarray | None
    """float32 [N, text_dim] caption embedding (zero rows: no text); None for ETL input."""
    cat1: np.ndarray
    """int64 [N] first-level category (0 = unknown)."""
    cat2: np.ndarray
    """int64 [N] second-level category (0 = unknown)."""
    x_group: np.ndarray
    """int64 [N] id of the item's distinct input row (equal x -> equal id)."""
    pairs: Pairs
    """Positive pairs (every item an anchor at least once)."""
    stats: dict
    """Data statistics for the report."""


def load_kuairec_data(kuairec_dir: Path, cfg: BenchConfig) -> BenchData:
    """KuaiRec side files -> x = [caption LSA | tag multi-hot], semantic (+ co-watch) pairs."""
    t0 = time.perf_counter()
    items = read_items(find_file(kuairec_dir, "kuairec_caption_category.csv"),
                       find_file(kuairec_dir, "item_categories.csv"))
    items = items.sort_values("item_id", key=lambda s: s.astype(str), kind="stable")
    items = items.reset_index(drop=True)  # row = item_idx
    n = len(items)
    t_read = time.perf_counter() - t0
    texts = items["caption"].tolist()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse CSR is "beta"
        emb = TextEmbedder.fit(texts, TextFeatureConfig(dim=cfg.text_dim, seed=cfg.seed))
        text = emb.transform(texts)  # [N, text_dim]
    t_text = time.perf_counter() - t0
    parts = [text]
    if cfg.tag_features:
        num_tags = max(max(t) for t in items["tags"] if len(t)) + 1
        tags = np.zeros((n, num_tags), np.float32)
        for row, t in enumerate(items["tags"]):
            tags[row, list(t)] = 1.0
        parts.append(l2_normalise(tags))
    x = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)  # [N, D]
    t0 = time.perf_counter()
    if cfg.pair_space not in ("content", "text"):
        raise ValueError(f"pair_space must be 'content' or 'text', got {cfg.pair_space!r}")
    pairs = semantic_neighbours(x if cfg.pair_space == "content" else text, cfg.top_p)
    stats = {"num_items": n, "input_dim": int(x.shape[1]), "read_s": round(t_read, 2),
             "text_fit_s": round(t_text, 2), "text_buckets": int(len(emb.buckets)),
             "items_without_text": int((np.linalg.norm(text, axis=1) == 0).sum()),
             "semantic_pairs": len(pairs)}
    sub = find_file(kuairec_dir, "small_subset_watch_ratio.csv", required=False)
    if cfg.cowatch and sub is not None:
        cw = cowatch_from_subset(sub, items["item_id"].astype(str).tolist(), cfg.cowatch_top_p)
        stats["cowatch_pairs"] = len(cw)
        pairs = merge_pairs(pairs, cw)
    pairs = complete_pairs(n, pairs)
    stats["pairs_s"] = round(time.perf_counter() - t0, 2)
    cat1 = items["cat1"].to_numpy(np.int64)
    cat2 = items["cat2"].to_numpy(np.int64)
    stats["source"] = "kuairec"
    return finish_data(x, text, cat1, cat2, pairs, stats)


def load_etl_data(etl_dir: Path, cfg: BenchConfig) -> BenchData:
    """An ETL output folder (DESIGN.md) -> x from ``items/``, positives from ``pairs/``.

    Categories: an item's first category id is level 1, its second (when it has one, e.g. the
    synthetic generator's ``top|sub``) level 2, else level 1 again. The ETL's pairs are used
    as written (co-occurrence partners plus weight-0 fill-ins); nothing is recomputed.
    """
    from higr_dist.data.loader import iterate_samples
    from higr_dist.data.shardio import list_shards
    from higr_dist.layout import EtlLayout
    from higr_dist.schema import FOLDERS
    from higr_dist.schema.items import ITEM

    etl = EtlLayout(etl_dir)
    t0 = time.perf_counter()
    idx, xs, c1, c2 = [], [], [], []
    for s in iterate_samples(list_shards(etl.kind("items")), ITEM):
        cats = list(s["categories"]) or [-1]
        idx.append(int(s["item_idx"]))
        xs.append(np.asarray(s["x"], dtype=np.float32))
        c1.append(int(cats[0]))
        c2.append(int(cats[1]) if len(cats) > 1 else int(cats[0]))
    order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
    n = len(idx)
    if not np.array_equal(np.asarray(idx)[order], np.arange(n)):
        raise ValueError(f"{etl_dir}/items: item_idx is not 0..N-1 exactly once")
    x = np.ascontiguousarray(np.stack(xs)[order], dtype=np.float32)  # [N, D]
    cat1 = np.asarray(c1, dtype=np.int64)[order]
    cat2 = np.asarray(c2, dtype=np.int64)[order]
    a, p, w = [], [], []
    for s in iterate_samples(list_shards(etl.kind("pairs")), FOLDERS["pairs"]):
        a.append(int(s["anchor"]))
        p.append(int(s["positive"]))
        w.append(float(s["weight"]))
    pairs = complete_pairs(n, Pairs(np.asarray(a, np.int64), np.asarray(p, np.int64),
                                    np.asarray(w, np.float32)))
    stats = {"source": "etl", "num_items": n, "input_dim": int(x.shape[1]),
             "read_s": round(time.perf_counter() - t0, 2), "etl_pairs": len(a)}
    return finish_data(x, None, cat1, cat2, pairs, stats)


def finish_data(x: np.ndarray, text: np.ndarray | None, cat1: np.ndarray, cat2: np.ndarray,
                pairs: Pairs, stats: dict) -> BenchData:
    """Shared statistics (pair/category agreement, duplicate-input floor) + the BenchData."""
    n = len(x)
    real = pairs.weight > 0
    stats.update({
        "pairs": len(pairs), "items_without_pair": int(n - len(np.unique(pairs.anchor[real]))),
        "pair_cat1_agreement": float((cat1[pairs.anchor[real]] == cat1[pairs.positive[real]]).mean())
        if real.any() else None,
        "pair_cat2_agreement": float((cat2[pairs.anchor[real]] == cat2[pairs.positive[real]]).mean())
        if real.any() else None,
        "duplicate_x_floor": float(colliding_mask(x.round(6)).mean()),
        "cat1_classes": int(len(np.unique(cat1))), "cat2_classes": int(len(np.unique(cat2))),
        "random_pair_cat1_agreement": float(((np.unique(cat1, return_counts=True)[1] / n) ** 2).sum()),
        "random_pair_cat2_agreement": float(((np.unique(cat2, return_counts=True)[1] / n) ** 2).sum()),
    })
    _, x_group = np.unique(x.round(6), axis=0, return_inverse=True)
    return BenchData(x, text, cat1, cat2, x_group.reshape(-1).astype(np.int64), pairs, stats)


def cowatch_from_subset(path: Path, item_ids: list[str], top_p: int) -> Pairs:
    """``user_id, video_id, watch_ratio`` (header optional) -> co-watch pairs in item_idx space."""
    import pandas as pd

    df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if not df.iloc[0, 2].replace(".", "", 1).isdigit():  # a header row
        df = df.iloc[1:]
    index = {v: i for i, v in enumerate(item_ids)}
    items = df[1].map(index)
    known = items.notna().to_numpy()
    return cowatch_pairs(df[0].to_numpy()[known], items[known].to_numpy(np.int64),
                         df[2].astype(float).to_numpy()[known], threshold=2.0, top_p=top_p)


# ---------------------------------------------------------------------------------------------
# training + evaluation
# ---------------------------------------------------------------------------------------------


def model_config(cfg: BenchConfig, method: str, input_dim: int, seed: int) -> PCRQVAEConfig:
    return PCRQVAEConfig(input_dim=input_dim, hidden_dims=list(cfg.hidden_dims),
                         latent_dim=cfg.latent_dim, K=cfg.K, L=cfg.L, tau=cfg.tau,
                         contrastive_target=cfg.contrastive_target,
                         kmeans_iters=cfg.kmeans_iters, restart_every=cfg.restart_every,
                         seed=seed, **METHODS[method])


def train(data: BenchData, cfg: BenchConfig, mcfg: PCRQVAEConfig, seed: int,
          device: str = "cpu") -> tuple[PCRQVAE, dict]:
    """The shipped stage's step() in a plain AdamW loop; returns the model and final terms."""
    torch.manual_seed(seed)
    stage = TokenizerStage()
    model, loss_module = stage.build(mcfg, PCRQVAELossConfig(lambda_c=cfg.lambda_c),
                                     StageInputs())
    model.to(device)
    x = torch.from_numpy(data.x).to(device)
    if cfg.codebook_init == "catalogue":
        model.init_codebooks(x)
    elif cfg.codebook_init != "first_batch":
        raise ValueError(f"codebook_init must be first_batch or catalogue, got {cfg.codebook_init!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    p = data.pairs
    anchor = torch.from_numpy(p.anchor).to(device)
    positive = torch.from_numpy(p.positive).to(device)
    weight = torch.from_numpy(p.weight).to(device)
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(p), generator=g), 0
    model.train()
    tail: dict[str, list[float]] = {}
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(p), generator=g), 0
        idx = order[pos:pos + cfg.batch_size].to(device)
        pos += cfg.batch_size
        batch = PairBatch(x[anchor[idx]], x[positive[idx]], weight[idx], anchor[idx],
                          positive[idx])
        out = stage.step(model, loss_module, batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(float(out.loss.detach())):
            raise FloatingPointError(f"{mcfg.mode}: loss {float(out.loss.detach())} at step {step}")
        if step >= cfg.steps - 100:  # average the last 100 steps' terms
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                tail.setdefault(k, []).append(float(torch.as_tensor(v).detach()))
    return model.eval(), {k: float(np.mean(v)) for k, v in tail.items()}


def evaluate(model: PCRQVAE, data: BenchData, K: int) -> dict:
    """SID metrics of the raw codes (before resolution) + resolution outcome."""
    codes, _, last = encode_items(model, data.x)
    rep = sid_report(codes, data.cat1, K)
    rep2 = sid_report(codes, data.cat2, K)
    last_book = model.quantizer.codebooks()[-1].detach().cpu().numpy()
    try:
        res = resolve_collisions(codes, K, last, last_book)
        resolution = {"moved_by_resolution": int(res.moved),
                      "collision_after": float(colliding_mask(res.sids).mean()),
                      "resolution_error": None}
    except CollisionError as e:  # a prefix group of > K items (identical inputs do that)
        resolution = {"moved_by_resolution": None, "collision_after": None,
                      "resolution_error": str(e)}
    real = data.pairs.weight > 0
    a, p = data.pairs.anchor[real], data.pairs.positive[real]
    return {
        "collision": rep["collision"],
        "concentration": rep["concentration"],
        "consistency": rep["consistency"],
        "concentration_cat2": rep2["concentration"],
        "consistency_cat2": rep2["consistency"],
        "concentration_by_prefix": rep["concentration_by_prefix"],
        "consistency_by_prefix": rep["consistency_by_prefix"],
        "consistency_cat2_by_prefix": rep2["consistency_by_prefix"],
        "unique_sids": rep["unique_sids"],
        "used_codes": rep["used_codes"],
        "usage": rep["usage"],
        "perplexity": rep["perplexity"],
        "pair_same_l1": float((codes[a, 0] == codes[p, 0]).mean()),
        "pair_same_prefix2": float((codes[a, :2] == codes[p, :2]).all(1).mean()),
        "collision_distinct_x": distinct_input_collision(codes, data.x_group),
        **resolution,
    }


def distinct_input_collision(codes: np.ndarray, x_group: np.ndarray) -> float:
    """Share of items whose SID is shared with an item of a *different* input x (collisions
    beyond the duplicate-input floor: the tokenizer's own doing)."""
    _, sid = np.unique(codes, axis=0, return_inverse=True)
    sid = sid.reshape(-1)
    pairs = np.unique(np.stack([sid, x_group], axis=1), axis=0)  # distinct (sid, x) cells
    inputs_per_sid = np.bincount(pairs[:, 0], minlength=sid.max() + 1)
    return float((inputs_per_sid[sid] > 1).mean())


def run_method(method: str, data: BenchData, cfg: BenchConfig, seed: int,
               device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    mcfg = model_config(cfg, method, data.x.shape[1], seed)
    if mcfg.mode == "rq_kmeans":
        rq = RQKMeans(RQKMeansConfig(K=cfg.K, L=cfg.L, iters=cfg.kmeans_iters, seed=seed))
        rq.fit(tensor_chunks(torch.from_numpy(data.x), 8192))
        model, terms = rq.to_model(data.x.shape[1], seed=seed), {}
    else:
        model, terms = train(data, cfg, mcfg, seed, device)
    result = evaluate(model, data, cfg.K)
    result["train_terms"] = terms
    result["wall_s"] = time.perf_counter() - t0
    return result


def _job(method: str, data: BenchData, cfg: BenchConfig, seed: int, device: str,
         threads: int) -> dict:
    """One (method, seed) in a worker process (``--jobs > 1``)."""
    torch.set_num_threads(threads)
    return run_method(method, data, cfg, seed, device)


def run_all(methods: list[str], data: BenchData, cfg: BenchConfig, device: str, threads: int,
            jobs: int) -> dict[str, list[dict]]:
    """Every (method, seed), ``jobs`` at a time (spawned processes of ``threads`` threads each);
    results in method order whatever the completion order."""
    todo = [(m, cfg.seed + s) for m in methods for s in range(cfg.seeds)]
    done: dict[tuple[str, int], dict] = {}

    def report(key: tuple[str, int], r: dict) -> None:
        done[key] = r
        print(f"{key[0]} seed {key[1]}: collision {r['collision']:.4f} consistency "
              f"{fmt(r['consistency'])} concentration {r['concentration']:.3f} "
              f"({r['wall_s']:.1f} s)", flush=True)

    if jobs <= 1:
        for m, seed in todo:
            report((m, seed), run_method(m, data, cfg, seed, device))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_job, m, data, cfg, seed, device, threads): (m, seed)
                       for m, seed in todo}
            for fut in as_completed(futures):
                report(futures[fut], fut.result())
    return {m: [done[(m, cfg.seed + s)] for s in range(cfg.seeds)] for m in methods}


def aggregate(runs: list[dict]) -> dict:
    """Mean over seeds for scalar keys (+ ``_std``), first run's value for the rest."""
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs]
            out[k] = float(np.mean(vals))
            out[f"{k}_std"] = float(np.std(vals))
    out["per_seed"] = runs
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def fmt(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(results: dict) -> str:
    head = (f"{'method':<18} {'collision':>9} {'conc@1':>7} {'cons@1':>7} {'cons@1 c2':>9} "
            f"{'cons@2':>7} {'coll!=x':>7} {'pair@l1':>7} {'used l1/l2/l3':>15} {'ppl l1':>7} "
            f"{'wall s':>7}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        used = "/".join(str(int(round(u))) for u in r["used_codes"])
        lines.append(
            f"{name:<18} {fmt(r['collision']):>9} {fmt(r['concentration'], 3):>7} "
            f"{fmt(r['consistency']):>7} {fmt(r['consistency_cat2']):>9} "
            f"{fmt(r['consistency_by_prefix'].get('2')):>7} {fmt(r['collision_distinct_x']):>7} "
            f"{fmt(r['pair_same_l1'], 3):>7} "
            f"{used:>15} {r['perplexity'][0]:>7.1f} {r['wall_s']:>7.1f}")
    lines.append("")
    lines.append("paper Table 2 (industrial): "
                 + "; ".join(f"{k} collision {fmt(v['collision'])} conc {fmt(v['concentration'], 2)}"
                             f" cons {fmt(v['consistency'])}" for k, v in PAPER_TABLE2.items()))
    return "\n".join(lines)


def checks(results: dict) -> dict:
    """The issue's acceptance checks, evaluated on the numbers (reported, never enforced)."""
    out = {}
    if {"rq_vae", "pcrq_vae_prefix2"} <= results.keys():
        rv, p2 = results["rq_vae"], results["pcrq_vae_prefix2"]
        out["prefix2_consistency_ratio_vs_rq_vae"] = p2["consistency"] / rv["consistency"]
        out["prefix2_consistency_ge_1.10x_rq_vae"] = p2["consistency"] >= 1.10 * rv["consistency"]
        out["prefix2_collision_le_rq_vae"] = p2["collision"] <= rv["collision"]
    if {"pcrq_vae_prefix2", "pcrq_vae_prefix3"} <= results.keys():
        out["prefix3_collision_gt_prefix2"] = (results["pcrq_vae_prefix3"]["collision"]
                                               > results["pcrq_vae_prefix2"]["collision"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--kuairec-dir", type=Path,
                     help="folder with kuairec_caption_category.csv[.zst], item_categories.csv[.zst]"
                          " (and optionally small_subset_watch_ratio.csv[.zst])")
    src.add_argument("--etl-dir", type=Path,
                     help="an ETL output folder (items/ and pairs/ shards, docs/DESIGN.md)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--device", default="cpu", help="torch device of the trained methods")
    ap.add_argument("--jobs", type=int, default=1,
                    help="(method, seed) runs at a time, each in its own process of --threads "
                         "threads (2 x 1 thread is the fastest use of 2 idle cores)")
    for f, default in asdict(BenchConfig()).items():
        kind = type(default)
        if kind is bool:
            ap.add_argument(f"--{f.replace('_', '-')}", default=default,
                            action=argparse.BooleanOptionalAction)
        elif kind is list:
            ap.add_argument(f"--{f.replace('_', '-')}", default=default,
                            type=lambda s: [int(v) for v in s.split(",")])
        else:
            ap.add_argument(f"--{f.replace('_', '-')}", default=default, type=kind)
    args = ap.parse_args(argv)
    cfg = replace(BenchConfig(), **{f: getattr(args, f) for f in asdict(BenchConfig())})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    if args.kuairec_dir is not None:
        data = load_kuairec_data(args.kuairec_dir, cfg)
    else:
        data = load_etl_data(args.etl_dir, cfg)
    print(json.dumps(data.stats), flush=True)
    runs = run_all(methods, data, cfg, args.device, args.threads, args.jobs)
    results = {m: aggregate(r) for m, r in runs.items()}
    print()
    print(table(results))
    check = checks(results)
    print(json.dumps(check, indent=1))
    payload = dict(results)
    payload["meta"] = {"config": asdict(cfg), "data": data.stats, "checks": check,
                       "paper_table2": PAPER_TABLE2, "threads": args.threads, "jobs": args.jobs,
                       "torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.machine(), "cpus": os.cpu_count(),
                       "loadavg_start": [round(v, 2) for v in load_start],
                       "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                       "argv": sys.argv[1:], "total_wall_s":
                       round(time.perf_counter() - t_all, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out} ({payload['meta']['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
