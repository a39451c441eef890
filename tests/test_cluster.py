"""The ETL on a real Spark cluster whose executors have neither our code nor its dependencies.

A standalone master and two workers (one core, 1 GiB each) on 127.0.0.1, started from the
pyspark install's ``spark-class`` with a bare environment (no PYTHONPATH, no venv on PATH). The
job is the README's ``spark-submit`` command (``readme_commands``): the executors' Python is the
shipped ``etl-env.tar.gz`` (``etl/pack_env.py``, built once per pyproject.toml into
``.cache/etl-env``), linked to a system interpreter that has no numpy or pyarrow, and our code
travels as ``--py-files higr_dist.zip``.

One job, the README's command with two shards and two shuffle partitions per stage: one
worker's executor JVM is SIGKILLed mid-job (after the validate phase, with cached blocks and
shuffle files on it). The job completes through task retry and a replacement executor; its
shards are byte-identical to ``local[2]``'s (the same config in the session's local Spark),
rows_in = rows_out + rows_quarantined, no partial shard or staging file is left; and every
Python worker seen on the executors ran ``./env/bin/python`` from its executor's work folder
(a link to the bare interpreter) with nothing but the cluster's pyspark and our zip on its
path. (One job carries both checks: a clean cluster run would add ~1.5 min and show nothing
the killed one does not.)

Every process the tests start is in its own process group and is killed by group in a
finalizer, also when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme_commands import readme_command, substitute

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "etl"))
import pack_env  # noqa: E402

from higr_dist.configs import HERE as CONFIGS  # noqa: E402

SPARK_HOME = Path(__import__("pyspark").__file__).parent
SUBMIT = "spark-submit --master spark://"
#: a small log: 300 users x 40 interactions, 200 items
DATA = {"users": 300, "items": 200, "interactions_per_user": 40, "seed": 0}
ETL_CONFIG = CONFIGS / "tiny" / "etl.yaml"
#: two shards per kind and two shuffle partitions: one task per executor core and stage
OVERRIDES = ["shuffle_partitions=2", "min_shards=2"]
JOB_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bare_python() -> str | None:
    """A system interpreter of the driver's major.minor that has none of our dependencies."""
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    for py in ("/usr/bin/python3", f"/usr/bin/python{want}"):
        if not os.access(py, os.X_OK):
            continue
        probe = subprocess.run(
            [py, "-c", "import sys; print('%d.%d' % sys.version_info[:2]); import numpy"],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        if probe.stdout.strip() == want and probe.returncode != 0:
            return py
    return None


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace_s``, and SIGKILL
    whatever of the group outlived its leader (executor JVMs, Python workers)."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    for pid in [pgid, *_pids_in_group(pgid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
        pass


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{tail}")


class Cluster:
    """A standalone master and two one-core workers on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        # a bare environment: what a cluster node has, not what this test process has
        self.env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                    "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1",
                    "SPARK_DAEMON_MEMORY": "256m", "SPARK_NO_DAEMONIZE": "1",
                    "SPARK_LOG_DIR": str(root / "logs"), "SPARK_PID_DIR": str(root)}
        if os.environ.get("JAVA_HOME"):
            self.env["JAVA_HOME"] = os.environ["JAVA_HOME"]

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as fh:
            self.procs[name] = subprocess.Popen(
                [str(SPARK_HOME / "bin" / "spark-class"), *args], env=self.env,
                cwd=self.root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        self._start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", "0"])
        _wait_for("master up", lambda: "Starting Spark master at" in
                  self.logs["master"].read_text(), 90, self.procs["master"], self.logs["master"])
        for i in (1, 2):
            work = self.root / f"work{i}"
            work.mkdir()
            self._start(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", self.url,
                                       "--host", "127.0.0.1", "--cores", "1", "--memory", "1g",
                                       "--webui-port", "0", "--work-dir", str(work)])
        for i in (1, 2):
            name = f"worker{i}"
            _wait_for(f"{name} registered", lambda n=name: "Successfully registered with master"
                      in self.logs[n].read_text(), 90, self.procs[name], self.logs[name])

    def executors(self, worker: str) -> list[int]:
        """Executor JVMs a worker started (its java children running the executor backend)."""
        return [c for c in _children(self.procs[worker].pid)
                if any("CoarseGrainedExecutorBackend" in a for a in _cmdline(c))]

    def stop(self) -> None:
        for name in ("worker1", "worker2", "master"):
            if name in self.procs:
                _kill_group(self.procs[name])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def bare_python() -> str:
    py = _bare_python()
    if py is None:
        pytest.skip("no system python3 of the driver's version without numpy (to prove that "
                    "executors get their dependencies from the shipped archive)")
    return py


@pytest.fixture(scope="module")
def shipped(root, bare_python) -> dict[str, Path]:
    """``make etl-env``'s two files (the environment cached per pyproject.toml)."""
    return pack_env.pack(root / "dist", python=bare_python)


@pytest.fixture(scope="module")
def data(spark, root) -> Path:
    from higr_dist.config import load
    from higr_dist.etl.synthetic import SyntheticConfig, generate

    shared = root / "shared"
    generate(spark, load(SyntheticConfig, None, [f"{k}={v}" for k, v in DATA.items()]),
             str(shared))
    return shared


@pytest.fixture(scope="module")
def local_out(spark, data) -> Path:
    """The reference: the same ETL config in ``local[2]`` (the session fixture)."""
    from higr_dist.config import load
    from higr_dist.etl.build import run_etl
    from higr_dist.etl.config import EtlConfig

    out = data.parent / "local"
    run_etl(spark, load(EtlConfig, ETL_CONFIG, OVERRIDES), str(data / "interactions"),
            str(data / "items"), out)
    return out


@pytest.fixture(scope="module")
def cluster(root, shipped, data):
    c = Cluster(root / "spark")
    c.root.mkdir()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _submit_argv(cluster: Cluster, root: Path, shipped: dict[str, Path], out: Path) -> list[str]:
    """The README's spark-submit command with this cluster, these folders and files."""
    return substitute(readme_command(SUBMIT), {
        "spark://master-host:7077": cluster.url,
        "dist/": f"{shipped['env'].parent}/",
        "/shared/higr/etl": str(out),
        "/shared/higr/": f"{root / 'shared'}/",
        ".venv/bin/python": sys.executable,
        "cluster/etl": str(ETL_CONFIG),
    })


def _submit_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_HOME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Job:
    """One spark-submit, watched: the Python workers seen on the executors, an optional
    SIGKILL of one worker's executor JVM when ``kill_when`` first holds."""

    def __init__(self, cluster: Cluster, argv: list[str], log: Path, kill_when=None,
                 kill_worker: str = "worker1"):
        self.cluster, self.argv, self.log = cluster, argv, log
        self.kill_when, self.kill_worker = kill_when, kill_worker
        self.python_workers: dict[int, dict] = {}
        self.killed: dict | None = None
        self.rc: int | None = None
        self.seconds = 0.0

    def _watch(self, proc: subprocess.Popen) -> None:
        groups = [p.pid for n, p in self.cluster.procs.items() if n.startswith("worker")]
        while proc.poll() is None and time.monotonic() - self.t0 < JOB_TIMEOUT_S:
            for pgid in groups:
                for pid in _pids_in_group(pgid):
                    if pid in self.python_workers:
                        continue
                    cmd = _cmdline(pid)
                    if not any(a.startswith("pyspark.") for a in cmd):
                        continue
                    try:
                        environ = dict(kv.split("=", 1) for kv in Path(
                            f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
                        self.python_workers[pid] = {
                            "argv0": cmd[0], "cwd": os.readlink(f"/proc/{pid}/cwd"),
                            "exe": os.readlink(f"/proc/{pid}/exe"),
                            "pythonpath": environ.get("PYTHONPATH", "")}
                    except OSError:
                        pass
            if self.kill_when is not None and self.killed is None and self.kill_when():
                jvms = self.cluster.executors(self.kill_worker)
                assert jvms, f"{self.kill_worker} runs no executor at the kill point"
                for pid in jvms:
                    os.kill(pid, signal.SIGKILL)
                out = Path(self.argv[self.argv.index("--output") + 1])
                self.killed = {"pids": jvms, "at_s": round(time.monotonic() - self.t0, 1),
                               "manifest_written": (out / "manifest.json").exists()}
            time.sleep(0.1)

    def run(self) -> Job:
        self.t0 = time.monotonic()
        with open(self.log, "wb") as fh:
            proc = subprocess.Popen(self.argv, cwd=ROOT, env=_submit_env(), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._watch(proc)
            proc.wait(timeout=5)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            self.rc = proc.returncode
            self.seconds = time.monotonic() - self.t0
        return self


def _tail(job: Job) -> str:
    return job.log.read_text()[-5000:]


@pytest.fixture(scope="module")
def job(cluster, root, shipped, local_out) -> Job:
    """The README's command on the cluster; one worker's executor JVM is SIGKILLed after the
    validate phase (the per-user frame is cached and shuffle files exist on both executors;
    features, pairs and the four user folders are still to come)."""
    out = root / "cluster-out"
    argv = [*_submit_argv(cluster, root, shipped, out), *OVERRIDES]
    return Job(cluster, argv, root / "submit.log",
               kill_when=lambda: (out / "quarantine" / "_SUCCESS").exists()).run()


def _files(out: Path) -> dict[str, str]:
    """sha256 of every shard and listing (the parts that must be byte-identical)."""
    got = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and (path.suffix == ".tar" or path.name == "shards.json"):
            got[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return got


def _manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k not in ("timings_s", "spark")}


def _assert_same_output(out: Path, ref: Path) -> None:
    got, want = _files(out), _files(ref)
    assert len(want) >= 12 and got == want, sorted(set(got.items()) ^ set(want.items()))[:6]
    assert _manifest(out) == _manifest(ref)
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"] > 0
    leftovers = [p for p in out.rglob("*")
                 if any(t in p.name for t in ("_tmp", ".tmp", "_temporary"))]
    assert not leftovers, leftovers  # no partial shard, no staging file


def test_the_environment_archive_is_slim(shipped, bare_python):
    meta = json.loads((shipped["cached"].parent / "env.json").read_text())
    names = {r.split("==")[0].lower() for r in meta["installed"]}
    assert {"numpy", "scipy", "pyarrow", "pandas", "orjson", "zstandard", "pyyaml",
            "webdataset"} <= names
    assert not names & {"torch", "deepspeed", "pyspark", "py4j", "higr-dist"}, names
    assert meta["python"] == os.path.realpath(bare_python)
    # the interpreter the archive links to has none of it: the archive is the only source
    for mod in ("numpy", "pyarrow", "higr_dist"):
        probe = subprocess.run([bare_python, "-c", f"import {mod}"], capture_output=True,
                               env={"PATH": "/usr/bin:/bin"}, cwd="/")
        assert probe.returncode != 0, mod


def _out(job: Job) -> Path:
    return Path(job.argv[job.argv.index("--output") + 1])


def _app_id(job: Job) -> str:
    for line in job.log.read_text().splitlines():
        if "Connected to Spark cluster with app ID" in line:
            return line.rsplit(" ", 1)[-1]
    raise AssertionError("no app ID in the submit log")


def test_cluster_etl_survives_a_killed_executor_byte_identical_to_local(job, local_out,
                                                                         cluster):
    assert job.killed is not None, "the kill point was never reached"
    assert not job.killed["manifest_written"]  # mid-job
    assert job.rc == 0, _tail(job)
    manifest = json.loads((_out(job) / "manifest.json").read_text())
    assert manifest["spark"]["master"] == cluster.url
    _assert_same_output(_out(job), local_out)
    # the driver saw the executor go, and the worker started a replacement for the app
    log = job.log.read_text()
    assert "Lost executor" in log or "is now EXITED" in log or "is now FAILED" in log, log[-3000:]
    executors = sorted(p.name for p in (cluster.root / "work1" / _app_id(job)).iterdir())
    assert len(executors) >= 2, executors


def test_executors_ran_the_shipped_python(job, cluster):
    assert job.rc == 0, _tail(job)
    workers = list(job.python_workers.values())
    assert workers, "no Python worker seen on the executors"
    for w in workers:
        # started as the archive's interpreter (linked to the bare system python), unpacked
        # in the executor's own work folder
        assert w["argv0"] == "./env/bin/python", w
        assert w["cwd"].startswith(str(cluster.root / "work")), w
        assert (Path(w["cwd"]) / "env" / "pyvenv.cfg").is_file(), w
        # on its path only the cluster's Spark (pyspark.zip, py4j, its jar) and our zip:
        # nothing of this checkout or of a venv's site-packages
        for entry in filter(None, w["pythonpath"].split(os.pathsep)):
            assert entry.startswith(str(SPARK_HOME)) or entry.endswith("higr_dist.zip"), w
