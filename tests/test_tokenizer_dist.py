"""Codebook surgery under real torch.distributed (2 gloo ranks, one machine): k-means init
sees the anchors of every rank and all ranks end with identical codebooks after init and
dead-code restarts, even with different per-rank batch sizes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from higr_dist.models.pcrq_vae import PCRQVAE, PCRQVAEConfig

pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        # rank 0 holds 5 distinct points, rank 1 holds 7: 12 in all, K = 12
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(5 + 2 * rank, 3, generator=g) * 10
        cfg = PCRQVAEConfig(input_dim=3, K=12, L=1, mode="rq_kmeans", kmeans_iters=0,
                            restart_every=2, dead_code_threshold=3.0, seed=rank)
        model = PCRQVAE(cfg).train()
        model(x)  # init from the anchors of both ranks
        init_book = model.quantizer.codebooks().clone()
        model(x)  # window closes: every code was used 2 < 3 times (summed over ranks): restart
        model(x[:2])
        torch.save({"x": x, "init": init_book, "after": model.quantizer.codebooks().clone(),
                    "restarted": model.quantizer.restarted.clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_surgery_is_identical_across_ranks(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # init used the union of both ranks' anchors: with K = 12 = #points every point is a codeword
    union = torch.cat([r0["x"], r1["x"]])
    assert torch.cdist(union, r0["init"][0]).min(dim=1).values.max() < 1e-5
    assert torch.equal(r0["init"], r1["init"])
    assert torch.equal(r0["after"], r1["after"]) and r0["restarted"].item() > 0
    assert torch.equal(r0["restarted"], r1["restarted"])
