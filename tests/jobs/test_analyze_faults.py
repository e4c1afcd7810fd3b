"""A real multi-node Ray cluster on loopback; one node is killed while jobs.analyze runs.

Head (0 CPUs) + two worker nodes (1 CPU each), each `ray start --block` in its own process
group with its own ports. The job runs as a subprocess against RAY_ADDRESS with 8 shards on 2
actors, each unit slowed by the engine's test hook (`engine.set_test_hook(Sleep(1.0))` in the job's
subprocess, tests/helpers.py) so that the kill lands mid-run.
After node A's process group is SIGKILLed, its shard must be retried on node B and the final
tables must equal a fault-free run on the same cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_ports

from tests.jobs.test_analyze import (ROOT, argv_for, assert_same_tables, hooked_job, make_data,
                                     tables_of)

RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")

# Fast failure detection: a dead node is noticed in ~1.5 s instead of the default ~15 s.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def _node_ports() -> list[str]:
    p = free_ports(6)
    return ["--object-store-memory=209715200", "--disable-usage-stats",
            "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
            "--metrics-export-port", str(p[4]), "--runtime-env-agent-port", str(p[5])]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # own session = own process group: killing it takes the raylet and its workers down too
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="rayf", dir="/tmp")   # short: Unix socket paths are limited
    # a private token: nodes, drivers and probes of this cluster share it, nobody else's matters
    env = {**os.environ, **FAST_HEALTH, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    gcs, client = free_ports(2)
    address = f"127.0.0.1:{gcs}"
    procs = {"head": _start(["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false",
                             "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client}",
                             f"--temp-dir={temp}", *_node_ports()], env, Path(temp, "head.log"))}
    time.sleep(2)
    for name in ("a", "b"):
        # its own temp dir: two nodes on one host must not share socket files
        procs[name] = _start([f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                              f"--temp-dir={temp}/{name}", *_node_ports()], env,
                             Path(temp, f"{name}.log"))
    try:
        try:
            _wait_for_cpus(address, env, 2)
        except RuntimeError as e:
            logs = {n: Path(temp, f"{n}.log").read_text()[-1500:] for n in procs}
            raise RuntimeError(f"{e}\n{logs}") from None
        yield {"address": address, "procs": procs, "env": env, "temp": temp}
    finally:
        for name in ("b", "a", "head"):
            _kill(procs[name])
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_cpus(address: str, env: dict, cpus: int, timeout: float = 120) -> None:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(int(ray.cluster_resources().get('CPU', 0)))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(cpus)]:
            return
        time.sleep(1)
    raise RuntimeError(f"cluster at {address} never reached {cpus} CPUs: "
                       f"{out.stdout[-300:]} {out.stderr[-1500:]}")


def test_killed_node_mid_run_gives_identical_tables(cluster, tmp_path):
    data = make_data(tmp_path)
    out = str(tmp_path / "faulty")
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    proc = subprocess.Popen(hooked_job(1.0, argv_for(data, out, "--shards", "8", "--workers", "2")),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(Path(out, "_partials").glob("*/*.done"))) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before the node could be killed"
        _kill(cluster["procs"]["a"])                     # node A: raylet, workers, everything
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 0, err[-3000:]
    run = json.loads(Path(out, "run.json").read_text())
    assert run["counts"]["retries"] >= 1, err[-3000:]
    assert "retrying on another worker" in err
    assert run["counts"]["units_computed"] == 8 and run["counts"]["images_read"] == 18

    # fault-free reference on the surviving node, other sharding (a subprocess as well: the
    # cluster's private auth token must not leak into this test process's Ray)
    ref = str(tmp_path / "reference")
    done = subprocess.run([sys.executable, "-m", "jobs.analyze",
                           *argv_for(data, ref, "--shards", "3", "--workers", "1")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tables(tables_of(ref), tables_of(out))
