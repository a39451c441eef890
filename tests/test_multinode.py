"""Two nodes without ssh: one ``deepspeed --no_ssh`` launcher per node over one hostfile.

The README's "Multi-node without ssh" command (``readme_commands``), run twice on this machine
as node 0 and node 1 of a hostfile that names two hosts resolving to loopback (1 slot each),
trains HSD (fp32, ZeRO-1, CPU ranks over gloo) for 12 steps on small real slate shards
(``helpers.write_slate_inputs``):

1. the two-node run ends with the weights of ``deepspeed --num_gpus 2`` on one node (1e-6);
2. node 1's launcher is SIGKILLed with its whole process group (launcher, local launcher and
   rank) after the first checkpoint: node 0 exits non-zero within 60 s instead of hanging;
   both launchers started again resume from the last checkpoint and end with the
   uninterrupted run's weights;
3. ``higr run`` builds the same per-node command from ``launch.node_rank`` and
   ``launch.master_addr``, and a node other than 0 waits for node 0's ETL manifest.

Every launch is its own process group, killed by group in a finalizer; DeepSpeed's CPU
all-reduce buffers in /dev/shm of the ports used are removed afterwards. ~1.5-2 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import slate_job, write_slate_inputs
from readme_commands import readme_command, substitute

pytestmark = pytest.mark.multinode

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "deepspeed --hostfile hostfile --no_ssh"
STEPS = 12
TRAIN = {"checkpoint_every": 4, "keep_last": 2, "log_every": 4, "dist_timeout_s": 30.0}
LAUNCH_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_hosts() -> list[str]:
    """Two host names that resolve to 127.0.0.1 (``localhost`` and this machine's name when it
    does, else the address itself)."""
    second = socket.gethostname()
    try:
        if not socket.gethostbyname(second).startswith("127.") or second == "localhost":
            second = "127.0.0.1"
    except OSError:
        second = "127.0.0.1"
    return ["localhost", second]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
               CUDA_VISIBLE_DEVICES="")  # CPU ranks (gloo) even on a GPU machine
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class Launches:
    """Every launcher process group a test starts, killed by group at the end; the /dev/shm
    buffers of the ports it used removed."""

    def __init__(self, root: Path):
        self.root, self.procs, self.ports = root, [], []
        self.count = 0

    def port(self) -> int:
        self.ports.append(_free_port())
        return self.ports[-1]

    def start(self, argv: list[str], name: str) -> subprocess.Popen:
        self.count += 1
        log = open(self.root / f"{self.count:02d}-{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_path = Path(log.name)
        log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
            try:  # members that outlived their leader (ranks)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for port in self.ports:
            for path in Path("/dev/shm").glob(
                    f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
                path.unlink(missing_ok=True)


def _wait(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{proc.args[:6]} still running after {timeout} s\n"
                             f"{proc.log_path.read_text()[-3000:]}") from None


def _ok(proc: subprocess.Popen) -> None:
    rc = _wait(proc)
    assert rc == 0, f"rc={rc}\n{proc.log_path.read_text()[-5000:]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    etl, sid = write_slate_inputs(root)
    config = root / "hsd.yaml"
    job = slate_job("hsd", etl, sid, root / "unused", 1, "fp32", dict(TRAIN), steps=STEPS)
    config.write_text(yaml.safe_dump(job))
    hostfile = root / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in _loopback_hosts()))
    launches = Launches(root)
    try:
        yield {"root": root, "config": config, "hostfile": hostfile, "launches": launches}
    finally:
        launches.close()


def _node(setup: dict, rank: int, port: int, out: Path) -> subprocess.Popen:
    """The README's per-node command as node ``rank``, training into ``out``."""
    argv = substitute(readme_command(COMMAND), {
        "$NODE_RANK": str(rank), "$MASTER_ADDR": "127.0.0.1"},
        words={"hostfile": str(setup["hostfile"]), "29500": str(port),
               "cluster/hsd": str(setup["config"])})
    return setup["launches"].start([*argv, f"run.out_dir={out}"], f"node{rank}-{out.name}")


def _two_nodes(setup: dict, out: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = setup["launches"].port()
    return _node(setup, 0, port, out), _node(setup, 1, port, out)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final" / "model_fp32.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).abs().max().item() if wa[k].numel() else 0.0
        assert diff <= 1e-6, (k, diff)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_node(setup) -> Path:
    """The reference: ``deepspeed --num_gpus 2`` on one node, the same config."""
    out = setup["root"] / "one-node"
    launches = setup["launches"]
    _ok(launches.start(["deepspeed", "--num_gpus", "2", "--master_port", str(launches.port()),
                        str(ROOT / "launcher" / "train.py"), "--config", str(setup["config"]),
                        f"run.out_dir={out}"], "one-node"))
    return out


@pytest.fixture(scope="module")
def two_nodes(setup, one_node) -> Path:
    out = setup["root"] / "two-nodes"
    for proc in _two_nodes(setup, out):
        _ok(proc)
    return out


def test_two_launchers_train_as_one_world_with_the_one_node_weights(two_nodes, one_node):
    s = _summary(two_nodes)
    assert s["world_size"] == 2 and s["final_step"] == STEPS
    assert s["losses"]["final"]["loss/total"] < s["losses"]["first"]["loss/total"]
    _assert_same_weights(two_nodes, one_node)


def test_a_killed_node_stops_the_other_and_both_resume(setup, two_nodes):
    out = setup["root"] / "killed"
    node0, node1 = _two_nodes(setup, out)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not latest.is_file() and time.monotonic() < deadline:
        assert node0.poll() is None and node1.poll() is None, node0.log_path.read_text()[-3000:]
        time.sleep(0.05)
    assert latest.is_file(), "no checkpoint within the time limit"
    os.killpg(node1.pid, signal.SIGKILL)  # the node is gone: launcher, local launcher, rank
    t_kill = time.monotonic()
    rc = _wait(node0, timeout=60)
    waited = time.monotonic() - t_kill
    node1.wait(timeout=10)
    assert rc != 0 and waited < 60, (rc, waited)
    assert not (out / "summary.json").exists()
    tail = node0.log_path.read_text()[-2500:]
    print(f"node 0 exited with {rc} {waited:.1f} s after node 1 was killed:\n{tail}")
    # both launchers again, as after a node replacement: resume and finish as if uninterrupted
    resumed_from = (out / "checkpoints" / "latest").read_text().strip()
    for proc in _two_nodes(setup, out):
        _ok(proc)
    s = _summary(out)
    assert s["resumed_from"] == resumed_from and s["final_step"] == STEPS
    _assert_same_weights(out, two_nodes)


# ---------------------------------------------------------------------------------------------
# higr run on several nodes
# ---------------------------------------------------------------------------------------------


def _pipeline(*overrides: str):
    from higr_dist.config import load
    from higr_dist.pipeline import PipelineConfig

    return load(PipelineConfig, "tiny", list(overrides))


def test_higr_run_builds_the_readme_command_per_node():
    from higr_dist.pipeline import launch_command

    for rank in (0, 1):
        cfg = _pipeline("launch.mode=deepspeed", "launch.hostfile=hostfile",
                        f"launch.node_rank={rank}", "launch.master_addr=10.0.0.1",
                        "launch.master_port=29500")
        cmd = launch_command(cfg, "cluster/hsd", ["run.seed=0"])
        readme = substitute(readme_command(COMMAND),
                            {"$NODE_RANK": str(rank), "$MASTER_ADDR": "10.0.0.1"})
        assert Path(cmd[0]).name == readme[0] == "deepspeed"
        assert cmd[1:] == readme[1:] + ["run.seed=0"]
    # one launcher over ssh, and one node: as before
    cfg = _pipeline("launch.mode=deepspeed", "launch.hostfile=hostfile")
    cmd = launch_command(cfg, "c.yaml", [])
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--hostfile", "hostfile"]
    assert "--no_ssh" not in cmd and cmd[-4:] == ["--module", "higr_dist.launch", "--config",
                                                  "c.yaml"]
    cfg = _pipeline("launch.mode=deepspeed", "launch.nproc=4")
    cmd = launch_command(cfg, "c.yaml", [])
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--num_gpus", "4"]


def test_higr_run_rejects_a_node_rank_without_its_launch_settings():
    from higr_dist.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _pipeline("launch.node_rank=1")
    assert any("needs mode: deepspeed and a hostfile" in p for p in e.value.problems)
    assert any("needs master_addr" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="node_rank: must be -1"):
        _pipeline("launch.node_rank=-2")


def test_a_node_other_than_0_waits_for_the_etl_manifest(tmp_path):
    from higr_dist.config import ConfigError, config_hash
    from higr_dist.pipeline import _etl_config, wait_for_etl

    cfg = _pipeline(f"out_root={tmp_path}", "name=mn", "launch.mode=deepspeed",
                    "launch.hostfile=hostfile", "launch.node_rank=1",
                    "launch.master_addr=127.0.0.1", "launch.wait_etl_s=1")
    with pytest.raises(ConfigError, match="no ETL output"):
        wait_for_etl(cfg, poll_s=0.05)  # node 0 never wrote it
    etl = tmp_path / "mn" / "etl"
    etl.mkdir(parents=True)
    (etl / "manifest.json").write_text(json.dumps({"config_hash": "another config"}))
    cfg.launch.wait_etl_s = 5.0
    want = {"config_hash": config_hash(_etl_config(cfg)), "rows_in": 7}

    def node0():  # rebuilds the output under this run's config, manifest written last
        time.sleep(0.5)
        tmp = etl / "manifest.json.tmp"
        tmp.write_text(json.dumps(want))
        os.replace(tmp, etl / "manifest.json")

    writer = threading.Thread(target=node0)
    writer.start()
    t0 = time.monotonic()
    try:
        assert wait_for_etl(cfg, poll_s=0.05) == want
    finally:
        writer.join()
    assert 0.4 < time.monotonic() - t0 < 5
