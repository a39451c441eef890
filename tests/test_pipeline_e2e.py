"""The main job end to end at a CI-sized scale: synthetic data (a Spark job) -> ETL -> tokenizer
-> HSD, flat, SASRec -> ORPO -> evaluation -> slates, through ``higr run``'s own code path.

Stages run in-process (a world of one) to keep CI fast; multi-rank training through the real
launchers is covered by the ``*_dist`` tests. The assertions are the report contract of issue 4
(keys scripts read), the ETL row invariant, and the learnability claim: the pretrained HSD beats
popularity on held-out users.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from higr_dist.config import ConfigError, load
from higr_dist.pipeline import PipelineConfig, run_pipeline, stale_stages

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "configs" / "tiny" / "run.yaml"
EVAL_KEYS = ("impressions.hit5", "impressions.recall5", "effective.hit5", "effective.recall5",
             "effective.ndcg5", "ild")


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


STEPS = {"tokenizer": 60, "hsd": 150, "flat": 150, "sasrec": 150, "orpo": 30}


def _overrides(root: Path, hsd_extra: str = "", etl_extra: str = "") -> list[str]:
    """The CI-sized run (and, for the stale-config test, the same run with one key changed)."""
    stages = ", ".join(
        f"{s}: [train.max_steps={n}, train.checkpoint_every=0, train.progress_bar=false, "
        f"data.num_workers=0, train.micro_batch_size=64, train.global_batch_size=64"
        f"{hsd_extra if s == 'hsd' else ''}]" for s, n in STEPS.items())
    return [
        "name=e2e", f"out_root={root}", "launch.mode=inprocess",
        "source.synthetic={users: 500, items: 300, interactions_per_user: 50}",
        f"etl_overrides=[samples_per_shard=500, min_shards=2, shuffle_partitions=2{etl_extra}]",
        "eval.latency_repeats=3", "eval.generate_users=10", "eval.max_users=256",
        "stage_overrides={" + stages + "}",
    ]


# the whole pipeline on a tiny log: minutes, and a JVM
pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(tmp_path_factory, spark) -> tuple[Path, dict]:
    # `spark` (session fixture) is requested so the pipeline reuses the one JVM of this test run
    overrides = _overrides(tmp_path_factory.mktemp("e2e"))
    cfg = load(PipelineConfig, TINY_RUN, overrides)
    rep = run_pipeline(cfg)
    return cfg.run_dir, rep


def test_report_contract(report):
    run_dir, rep = report
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["etl"] == json.loads(json.dumps(rep["etl"]))
    etl = on_disk["etl"]
    assert etl["rows_in"] == etl["rows_out"] + etl["rows_quarantined"] > 0
    for key in ("collision", "concentration", "consistency"):
        assert 0.0 <= on_disk["tokenizer"][key] <= 1.0, key
    for model in ("higr", "higr_no_align", "flat", "sasrec", "popularity"):
        for key in EVAL_KEYS:
            assert 0.0 <= _get(on_disk["eval"][model], key) <= 1.0, (model, key)
    for model in ("higr", "flat"):
        d = on_disk["decode"][model]
        assert d["median_ms"] > 0 and d["p99_ms"] >= d["median_ms"] and d["slates_per_s"] > 0
    assert on_disk["decode"]["speedup"] > 0
    assert Path(on_disk["tensorboard"]).is_dir()
    assert any(Path(on_disk["tensorboard"]).rglob("events.out.tfevents.*"))
    md = (run_dir / "report.md").read_text()
    assert "popularity" in md and "NDCG" in md
    assert list(run_dir.glob("*.png")) or list((run_dir / "plots").glob("*.png"))


def test_in_process_run_leaves_no_process_group(report):
    # later tests fork gloo workers: an inherited default group breaks their init
    import os

    import torch.distributed as dist

    assert not dist.is_initialized()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_hsd_beats_popularity(report):
    _, rep = report
    hsd = rep["eval"]["higr_no_align"]["effective"]["ndcg5"]
    pop = rep["eval"]["popularity"]["effective"]["ndcg5"]
    assert hsd > pop, (hsd, pop)


def test_slates_are_real_distinct_items(report):
    run_dir, _ = report
    lines = (run_dir / "slates.jsonl").read_text().splitlines()
    assert len(lines) == 10
    import pyarrow.parquet as pq

    known = set(pq.read_table(run_dir / "etl" / "item_index").column("item_id").to_pylist())
    for line in lines:
        row = json.loads(line)
        items = row["item_ids"]
        assert len(items) == 5 and len(set(items)) == 5
        assert set(items) <= known


def test_validation_split_precedes_test(report):
    # model selection (higr_dist.engine.validate) reads `val`: its targets must be the 5 interactions just
    # before each user's test window, and never the test window itself
    from higr_dist.eval.harness import test_batches

    run_dir, _ = report

    def by_user(split: str) -> dict:
        return {s["user_id"]: s for _, buf in test_batches(run_dir / "etl", lambda b: None, 64,
                                                           split=split) for s in buf}

    val, test = by_user("val"), by_user("test")
    assert val and val.keys() <= test.keys()
    for user, v in val.items():
        t = test[user]
        assert list(t["hist_items"][-len(v["target_items"]):]) == list(v["target_items"])
        assert v["ts"] < t["ts"]


def test_rerun_refuses_stages_trained_under_another_config(report):
    # a re-run reuses finished stages; one trained under other settings must stop the run
    # before any process starts (naming the keys), never be reported as the new config's model
    run_dir, _ = report
    same = load(PipelineConfig, TINY_RUN, _overrides(run_dir.parent))
    assert stale_stages(same) == []

    lr = load(PipelineConfig, TINY_RUN, _overrides(run_dir.parent, hsd_extra=", train.lr=0.0123"))
    problems = stale_stages(lr)
    assert len(problems) == 1 and problems[0].startswith("hsd: ")
    assert "train.lr: " in problems[0] and "-> 0.0123" in problems[0]
    with pytest.raises(ConfigError, match="train.lr"):
        run_pipeline(lr)

    etl = load(PipelineConfig, TINY_RUN, _overrides(run_dir.parent, etl_extra=", min_shards=3"))
    problems = stale_stages(etl)
    assert [p.split(":")[0] for p in problems] == list(STEPS)
    assert all("another ETL config" in p for p in problems)
    assert (run_dir / "hsd" / "final" / "model_fp32.pt").is_file()  # nothing was deleted

    # shards written by an older schema (e.g. per-window slates/train) are refused too
    manifest = run_dir / "etl" / "manifest.json"
    text = manifest.read_text()
    try:
        manifest.write_text(json.dumps(dict(json.loads(text), schema_version="items1-old")))
        problems = stale_stages(same)
        assert problems[0].startswith("etl: ") and "schema items1-old" in problems[0]
    finally:
        manifest.write_text(text)
    assert stale_stages(same) == []


def test_settings_follow_the_data_and_models_are_selected_on_validation(report):
    """higr run sized K, the identity table and training length from the manifest, passed
    them to every stage alike, and each slate model kept its best validation weights."""
    import yaml

    from higr_dist.sizing import SizingConfig, codebook_size, id_buckets

    run_dir, rep = report
    items = rep["etl"]["num_items"]
    cfg = SizingConfig()
    for stage in ("tokenizer", "hsd", "flat", "orpo"):
        resolved = yaml.safe_load((run_dir / stage / "resolved_config.yaml").read_text())
        assert resolved["model"]["K"] == codebook_size(items, cfg), stage
        if stage != "tokenizer":
            assert resolved["model"]["id_buckets"] == id_buckets(items, cfg), stage
    for stage in ("hsd", "flat", "sasrec", "orpo"):
        sel = rep["selection"][stage]
        steps = [h["step"] for h in sel["history"]]
        assert sel["kept"] == "best" and sel["best"]["step"] in steps, stage
        assert sel["best"]["ndcg5"] == max(h["ndcg5"] for h in sel["history"]), stage
    assert rep["selection"]["orpo"]["history"][0]["step"] == 0  # the pretrained HSD competes
    md = (run_dir / "report.md").read_text()
    assert "Model selection (validation split)" in md and "HiGR minus sasrec" in md
