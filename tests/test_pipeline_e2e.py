"""The main job end to end at a CI-sized scale, as a user installs and runs it: this checkout
``pip install``-ed (not editable) into a fresh venv, then ``higr run --config tiny --name smoke``
from an empty folder: synthetic data (a Spark job) -> ETL -> tokenizer -> HSD, flat, SASRec ->
ORPO -> evaluation -> slates, every stage through ``torchrun`` and ``higr_dist.launch`` on two
ranks, as shipped.

The fresh venv takes its dependencies from this test run's venv (a ``.pth`` line), so nothing
is downloaded but the build backend; the checkout itself is neither on the path nor the working
folder, and the run records which copy of the code ran (``run_meta.json``). The assertions are
the report contract (keys scripts read), the ETL row invariant, and the learnability claim:
the pretrained HSD beats popularity on held-out users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from higr_dist.config import ConfigError, load
from higr_dist.pipeline import PipelineConfig, run_pipeline, stale_stages

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("impressions.hit5", "impressions.recall5", "effective.hit5", "effective.recall5",
             "effective.ndcg5", "ild")


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


STEPS = {"tokenizer": 60, "hsd": 150, "flat": 150, "sasrec": 150, "orpo": 30}


def _overrides(hsd_extra: str = "", etl_extra: str = "") -> list[str]:
    """The CI-sized run (and, for the stale-config test, the same run with one key changed)."""
    stages = ", ".join(
        f"{s}: [train.max_steps={n}, train.checkpoint_every=0, train.progress_bar=false, "
        f"data.num_workers=0, train.micro_batch_size=32, train.global_batch_size=64"
        f"{hsd_extra if s == 'hsd' else ''}]" for s, n in STEPS.items())
    return [
        "source.synthetic={users: 500, items: 300, interactions_per_user: 50}",
        f"etl_overrides=[samples_per_shard=500, min_shards=2, shuffle_partitions=2{etl_extra}]",
        "eval.latency_repeats=3", "eval.generate_users=10", "eval.max_users=256",
        "stage_overrides={" + stages + "}",
    ]


def _config(work: Path, **changes: str) -> PipelineConfig:
    """The smoke run's config as this process loads it (its run folder: ``work/runs/smoke``)."""
    return load(PipelineConfig, "tiny",
                ["name=smoke", f"out_root={work / 'runs'}", *_overrides(**changes)])


# the whole pipeline on a tiny log: minutes, and a JVM
pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with this checkout installed as a user installs it (its ``bin``)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies: this venv's packages, read through a path line (their .pth files,
    # among them the editable install of this checkout, are not processed)
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", f"{ROOT}[etl,train]"],
                   check=True, cwd=venv)
    return venv / "bin"


def _user_env(bin_dir: Path) -> dict:
    """A user's shell with the fresh venv active: no checkout on any path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ours = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(bin_dir), *(d for d in env["PATH"].split(os.pathsep)
                                                   if d and d != ours)])
    env.update(VIRTUAL_ENV=str(bin_dir.parent), PYSPARK_PYTHON=str(bin_dir / "python"),
               PYSPARK_DRIVER_PYTHON=str(bin_dir / "python"))
    return env


@pytest.fixture(scope="module")
def report(installed, tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("empty")
    proc = subprocess.run([installed / "higr", "run", "--config", "tiny", "--name", "smoke",
                           *_overrides()], cwd=work, env=_user_env(installed),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run_dir = work / "runs" / "smoke"
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_the_installed_package_ran_not_the_checkout(report, installed):
    run_dir, _ = report
    site = installed.parent.resolve()
    for meta in [run_dir / "run_meta.json", *sorted(run_dir.glob("*/run_meta.json"))]:
        m = json.loads(meta.read_text())
        assert Path(m["package"]).is_relative_to(site), (meta, m["package"])
        assert m["git_sha"] == "unknown", meta  # an installed package is no checkout
    assert len(list(run_dir.glob("*/run_meta.json"))) == len(STEPS)  # every stage's ranks


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
    work = run_dir.parents[1]
    same = _config(work)
    assert stale_stages(same) == []

    lr = _config(work, hsd_extra=", train.lr=0.0123")
    problems = stale_stages(lr)
    assert len(problems) == 1 and problems[0].startswith("hsd: ")
    assert "train.lr: " in problems[0] and "-> 0.0123" in problems[0]
    with pytest.raises(ConfigError, match="train.lr"):
        run_pipeline(lr)

    etl = _config(work, etl_extra=", min_shards=3")
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
