"""report.md and its plots, rebuilt from event files and a report dict (no training)."""

from __future__ import annotations

import json

import pytest

from higr_dist.engine.logging import RunLogger
from higr_dist.eval import report as rep


def _eval(ndcg: float, ild: float) -> dict:
    return {"impressions": {"hit5": 0.5, "recall5": 0.3},
            "effective": {"hit5": 0.4, "recall5": 0.3, "ndcg5": ndcg}, "ild": ild,
            "ci95": {"ndcg5": [ndcg - 0.01, ndcg + 0.01], "ild": [ild - 0.02, ild + 0.02]},
            "users": 100, "effective_users": 80}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with two stages' event files: one written through today's logger, one
    under the trainer's raw keys (as event files from before the tag groups)."""
    log = RunLogger(tmp_path / "hsd", enabled=True, total_steps=3, start_step=0,
                    progress_bar=False)
    for step in (1, 2, 3):
        log.write(step, {"loss/total": 2.0 / step, "loss/ce": 1.9 / step, "loss/acc": 0.1 * step,
                         "perf/samples_per_s": 100.0, "perf/mfu": 0.1,
                         "perf/data_wait_share": 0.05, "mem/rss_gb": 0.5,
                         "val/ndcg5": 0.2 + step / 100})
    log.close()
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tokenizer" / "tb"))
    for step in (1, 2):
        for tag, v in {"loss/total": 1.0, "loss/perplexity_l1": 9.0, "perf/samples_per_s": 500.0,
                       "perf/mfu": 0.001}.items():
            w.add_scalar(tag, v, step)
    w.close()
    return tmp_path


def test_report_has_one_panel_per_quantity_and_every_plot(run_dir):
    series = rep.stage_series({s: run_dir / s / "tb" for s in ("hsd", "tokenizer")})
    # event files under the raw keys are read under today's tags
    assert "health/samples_per_s" in series["tokenizer"]
    assert "sid/perplexity_l1" in series["tokenizer"]
    assert "train/acc" in series["hsd"] and "loss/acc" not in series["hsd"]
    report = {"name": "t", "eval": {"higr": _eval(0.4, 0.5), "flat": _eval(0.35, 0.4),
                                    "popularity": _eval(0.05, 0.8)},
              "decode": {"beam": 10, "higr": {"batch": 64, "median_ms": 50.0, "p99_ms": 60.0,
                                              "slates_per_s": 1280.0},
                         "flat": {"batch": 64, "median_ms": 150.0, "p99_ms": 170.0,
                                  "slates_per_s": 426.0}, "speedup": 3.0}}
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "throughput.png").write_bytes(b"old layout")
    _, md = rep.write_report(run_dir, report, {s: run_dir / s / "tb"
                                               for s in ("hsd", "tokenizer")})
    names = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert names == ["decode_latency.png", "diagnostics.png", "loss.png", "models.png",
                     "quality_latency.png", "training_health.png"]
    text = md.read_text()
    for name in names:
        assert f"(plots/{name})" in text
    # without a beam sweep the plot has the run's own beam: one point per decoder
    points = rep.quality_latency_points(report)
    assert [(p["decoder"], p["beam"]) for p in points] == [("higr", 10), ("flat", 10)]
    sweep = {"points": [{"decoder": "higr", "beam": b, "ndcg5": 0.3, "median_ms": 9.0 * b,
                         "batch": 64} for b in (1, 5)]}
    assert rep.quality_latency_points(report, sweep) == sweep["points"]


def test_report_cli_rebuilds_from_a_run_folder(run_dir, capsys):
    assert rep.main(["--run-dir", str(run_dir)]) == 2  # no report.json yet
    (run_dir / "report.json").write_text(json.dumps({"name": "t"}))
    assert rep.main(["--run-dir", str(run_dir)]) == 0
    assert (run_dir / "plots" / "training_health.png").is_file()
    assert (run_dir / "report.md").read_text().startswith("# higr-dist run report: t")
