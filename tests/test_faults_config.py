"""Malformed configs, hostfiles and CLI arguments: one line naming the key, exit 2, never a
traceback (docs/RELIABILITY.md, "Bad configs and arguments").

Every shipped config (``configs/**/*.yaml``: job configs through ``higr-preflight``, ETL
configs through the ETL CLI, run configs through ``higr run``) gets, in each of its sections
and fields (the resolved config's: defaults included), values of the wrong shape or range
(``[]``, ``{}``, ``null``, ``"nan"``, huge, negative, other types). All entry points are called
in-process (``main(argv)``, what the console scripts run) so thousands of cases cost seconds;
inputs never exist, so nothing starts Spark or a training run. The promise checked per case:

- the call returns 0 or 2 and raises nothing (an exception would be the traceback a user sees);
- no problem line is a check that crashed (``check failed with``: a bug behind the guard);
- a value of the wrong type for its field (a list or mapping where a scalar belongs, a scalar
  where a section belongs) is rejected, and the output names the field's dotted key.

The full sweep (every file x every field x every value) is marked ``faults`` (``make
test-faults``); ``make test`` runs a hypothesis sample of it (``test_fuzz_sample``) and the
CLI cases.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from higr_dist import configs
from higr_dist.config import load, to_dict
from higr_dist.configs import HERE as CONFIGS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = configs.all_files()
#: malformed values tried in every field
BAD = [[], {}, None, "nan", "inf", 1e308, 10**40, -1, -1e9, "x", True, [[1], "a"],
       {"a": {"b": 1}}]
MISSING = "/nonexistent/higr-fault"


def kind_of(path: Path) -> str:
    if path.name == "run.yaml":
        return "run"
    if path.name == "etl.yaml":
        return "etl"
    return "job"


def resolved(path: Path) -> dict:
    """The config as its loader resolves it (every field, defaults included)."""
    kind = kind_of(path)
    if kind == "job":
        from higr_dist.engine.config import load_job

        return to_dict(load_job(path))
    if kind == "etl":
        from higr_dist.etl.config import EtlConfig

        return to_dict(load(EtlConfig, path))
    from higr_dist.pipeline import PipelineConfig

    return to_dict(load(PipelineConfig, path))


def field_paths(data: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(dotted key as a tuple, current value) of every section and field, depth first."""
    out = []
    for key, value in data.items():
        path = (*prefix, str(key))
        out.append((path, value))
        if isinstance(value, dict):
            out.extend(field_paths(value, path))
    return out


FIELDS = {p: field_paths(resolved(p)) for p in SHIPPED}
RAW = {p: yaml.safe_load(p.read_text()) or {} for p in SHIPPED}
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def set_path(data: dict, path: tuple, value) -> dict:
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)  # never share (or mutate) a BAD value
    return data


def must_reject(current, value) -> bool:
    """A value of the wrong shape for the field (the loader must name the key); a field
    whose current value is null may be of any type."""
    if current is None:
        return False
    if isinstance(current, dict):
        return not isinstance(value, dict) and value is not None
    if isinstance(current, list):
        return isinstance(value, dict)
    return isinstance(value, list | dict)  # a scalar field


def call(kind: str, config: Path, tmp: Path, capsys) -> tuple[int, str]:
    """The kind's CLI on ``config`` (in-process); (exit code, stdout + stderr)."""
    if kind == "job":
        from higr_dist.engine.preflight import main

        rc = main(["--config", str(config), "--world-size", "2"])
    elif kind == "etl":
        from higr_dist.etl.build import main

        rc = main(["--interactions", f"{MISSING}/i.csv", "--items", f"{MISSING}/t.csv",
                   "--output", str(tmp / "etl"), "--config", str(config)])
    else:
        from higr_dist.pipeline import main

        rc = main(["--config", str(config), "--interactions", f"{MISSING}/i.csv",
                   "--items", f"{MISSING}/t.csv"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def check_case(source: Path, changes: list[tuple[tuple, object]], tmp: Path, capsys) -> bool:
    """Write ``source`` with ``changes`` applied, run its CLI, assert the promise; True when
    the config was rejected."""
    # a change under a key that a later change replaces is gone
    changes = [(path, value) for i, (path, value) in enumerate(changes)
               if not any(path[:len(p)] == p for p, _ in changes[i + 1:])]
    data = copy.deepcopy(RAW[source])
    for path, value in changes:
        set_path(data, path, value)
    config = tmp / f"fuzz-{source.parent.name}-{source.name}"
    config.write_text(yaml.dump(data, Dumper=DUMPER))
    rc, out = call(kind_of(source), config, tmp, capsys)
    case = f"{source.relative_to(CONFIGS)} with {changes!r}"
    assert rc in (0, 2), f"{case}: exit {rc}\n{out}"
    assert "Traceback" not in out and "check failed with" not in out, f"{case}:\n{out}"
    current = dict(FIELDS[source])
    stage_broken = any(path == ("stage",) for path, _ in changes)
    for path, value in changes:
        if stage_broken and path[0] in ("model", "loss"):
            continue  # their types depend on the stage: checked once it is valid
        if path in current and must_reject(current[path], value):
            assert rc == 2, f"{case}: accepted\n{out}"
            assert ".".join(path) in out, f"{case}: the key is not named\n{out}"
    return rc == 2


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.faults(ci=True)
def test_every_shipped_config_is_covered():
    kinds = {kind_of(p) for p in SHIPPED}
    assert kinds == {"job", "etl", "run"} and len(SHIPPED) >= 20
    for path, fields in FIELDS.items():  # the resolved configs: sections and their fields
        assert len(fields) >= 10, path


CASE = st.sampled_from(SHIPPED).flatmap(lambda p: st.tuples(
    st.just(p), st.lists(st.tuples(st.sampled_from([f for f, _ in FIELDS[p]]),
                                    st.sampled_from(BAD) | st.recursive(
                                        st.none() | st.booleans() | st.integers()
                                        | st.floats() | st.text(max_size=8),
                                        lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(st.text(max_size=4), c, max_size=3),
                                        max_leaves=6)),
                         min_size=1, max_size=3)))


@pytest.mark.faults(ci=True)
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=CASE)
def test_fuzz_sample(case, tmp_path, capsys):
    """Hypothesis: 1-3 fields of one shipped config set to malformed or arbitrary values."""
    source, changes = case
    check_case(source, changes, tmp_path, capsys)


@pytest.mark.faults
@pytest.mark.parametrize("source", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_field_every_bad_value(source, tmp_path, capsys):
    """The full sweep: each field of the resolved config, one at a time, with every BAD value."""
    tried = rejected = 0
    for path, _ in FIELDS[source]:
        for value in BAD:
            rejected += check_case(source, [(path, value)], tmp_path, capsys)
            tried += 1
    print(f"{source.relative_to(CONFIGS)}: {tried} malformed configs, {rejected} rejected, "
          "0 tracebacks")
    assert tried == len(FIELDS[source]) * len(BAD)


# --------------------------------------------------------------------------------------------
# whole files and hostfiles
# --------------------------------------------------------------------------------------------

WHOLE_FILES = {"empty": b"", "list": b"- 1\n- 2\n", "scalar": b"42\n", "bad_yaml": b"a: [1,\n",
               "tabs": b"train:\n\tlr: 1\n", "binary": bytes(range(256)) * 4,
               "bad_utf8": b"run:\n  name: \xff\xfe\n", "null_sections": b"train: null\ndata: ~\n"}


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("kind", ["job", "etl", "run"])
@pytest.mark.parametrize("content", list(WHOLE_FILES), ids=list(WHOLE_FILES))
def test_whole_file_garbage(kind, content, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(WHOLE_FILES[content])
    rc, out = call(kind, config, tmp_path, capsys)
    assert rc == 2 and "Traceback" not in out and "check failed with" not in out, out
    assert out.strip(), "a rejection must say why"


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("kind", ["job", "etl", "run"])
def test_config_that_is_missing_or_a_folder(kind, tmp_path, capsys):
    for config in (tmp_path / "absent.yaml", tmp_path):
        rc, out = call(kind, config, tmp_path, capsys)
        assert rc == 2 and "Traceback" not in out, out
        assert str(config) in out, out


HOSTFILE_LINE = st.one_of(
    st.text(max_size=30),
    st.builds(lambda h, s: f"{h} slots={s}", st.text(max_size=8),
              st.sampled_from(["", "-1", "0", "x", "1.5", "nan", str(10**30), "2 3"])))


@pytest.mark.faults(ci=True)
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(HOSTFILE_LINE, min_size=0, max_size=4))
def test_fuzz_hostfile(lines, tmp_path, capsys):
    from higr_dist.engine.preflight import main

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("\n".join(lines), errors="surrogateescape")
    rc = main(["--config", str(CONFIGS / "tiny" / "tokenizer.yaml"),
               "--hostfile", str(hostfile)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 2 and "Traceback" not in text and "check failed with" not in text, (lines, text)


# --------------------------------------------------------------------------------------------
# the CLIs' other arguments
# --------------------------------------------------------------------------------------------


def _run_cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, no traceback, one stderr line (or, for a config, a header and one line per
    problem) holding ``words``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    problems = [ln for ln in lines[1:] if ln.startswith("  - ")]
    assert len(lines) == 1 or (lines[0].endswith("invalid config:")
                               and len(problems) == len(lines) - 1), out
    for word in words:
        assert word in proc.stderr, (word, out)


def _fake_run(tmp: Path) -> Path:
    """A folder that looks like a pipeline run folder but holds nothing trained."""
    run = tmp / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text((CONFIGS / "tiny" / "run.yaml").read_text())
    return run


@pytest.mark.faults(ci=True)
def test_eval_and_generate_arguments(tmp_path, capsys):
    from higr_dist.eval.harness import eval_main, generate_main

    run = _fake_run(tmp_path)
    (tmp_path / "afile").write_text("x")
    cases = [
        (eval_main, ["--run-dir", f"{MISSING}/run"], "is not a folder"),
        (eval_main, ["--run-dir", str(tmp_path / "afile")], "is not a folder"),
        (eval_main, ["--run-dir", str(run)], "not a finished pipeline run folder"),
        (generate_main, ["--run-dir", f"{MISSING}/run"], "is not a folder"),
        (generate_main, ["--run-dir", str(run)], "not a finished pipeline run folder"),
    ]
    for fn, argv, words in cases:
        rc = fn(argv)
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    # a run folder with the files present but unreadable content
    for name in ("etl/manifest.json", "tokenizer/export/sid_report.json",
                 "tokenizer/export/sid_table.npy", "hsd/final/model_fp32.pt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"\xff\x00 not what it should be")
    (run / "resolved_config.yaml").write_text("name: [unclosed\n")
    rc = eval_main(["--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "resolved_config.yaml" in err and len(err.strip().splitlines()) == 1, err
    rc = generate_main(["--run-dir", str(run)])  # reads the garbage SID table first
    err = capsys.readouterr().err
    assert rc == 2 and "higr-generate:" in err and len(err.strip().splitlines()) == 1, err
    (run / "resolved_config.yaml").write_text((CONFIGS / "tiny" / "run.yaml").read_text())
    rc = eval_main(["--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "manifest.json" in err and len(err.strip().splitlines()) == 1, err
    for argv, words in ((["--device", "tpu:7"], "tpu"), (["--users", f"{MISSING}/u.txt"], "u.txt"),
                        (["--users", str(tmp_path)], str(tmp_path)),
                        (["--out", str(tmp_path)], "is a folder")):
        rc = generate_main(["--run-dir", str(run), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    for argv in (["--num-users", "-3"], ["--beam", "0"], ["--beam", "many"]):
        with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line, exit 2
            generate_main(["--run-dir", str(run), *argv])
        assert exc.value.code == 2


@pytest.mark.faults(ci=True)
def test_cli_processes_exit_2_with_one_line(tmp_path):
    """The console entry points as processes: exit code 2 and one stderr line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: []}\nstage: tokenizer\n")
    _one_line_exit_2(_run_cli(["higr_dist.cli", "run", "--config", f"{MISSING}/run.yaml"]),
                     "higr run", "run.yaml")
    _one_line_exit_2(_run_cli(["higr_dist.cli", "run", "--interactions", f"{MISSING}/i.csv",
                               "--items", f"{MISSING}/t.csv"]), "source.interactions")
    _one_line_exit_2(_run_cli(["higr_dist.cli", "eval", "--run-dir", f"{MISSING}/r"]),
                     "higr-eval")
    _one_line_exit_2(_run_cli(["higr_dist.cli", "generate", "--run-dir", f"{MISSING}/r"]),
                     "higr-generate")
    _one_line_exit_2(_run_cli(["higr_dist.etl.build", "--interactions", f"{MISSING}/i.csv",
                               "--items", f"{MISSING}/t.csv", "--output", str(tmp_path / "o")]),
                     "--interactions not found")
    proc = _run_cli(["higr_dist.cli", "preflight", "--config", str(bad)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.lr" in proc.stderr, proc.stderr
