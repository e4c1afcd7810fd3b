"""A real multi-node Ray cluster on loopback; one node is killed while jobs.analyze runs.

Head (0 CPUs) + two worker nodes (1 CPU each), all on 127.0.0.1 (ray.cluster_utils.Cluster in
this process, not connected to it: each node its own raylet and object store, started with
node_ip_address 127.0.0.1, so nothing listens on another address). The job runs as a subprocess against RAY_ADDRESS with 8 shards on 2
actors, each unit slowed (jobs.analyze.ShardWorker replaced by tests.helpers.slowed's subclass
in the job's subprocess) so that the kill lands mid-run. After node A is removed without grace
(its raylet and workers killed), Ray restarts its actor on node B and retries its shards
(max_restarts / max_task_retries), and the final tables must equal a fault-free run on the same
cluster.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import LOOPBACK

from tests.jobs.test_analyze import (ROOT, argv_for, assert_same_tables, hooked_job, make_data,
                                     tables_of)

# Fast failure detection: a dead node is noticed in ~1.5 s instead of the default ~15 s.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # the GCS reads its health-check settings from the environment it is started with
    saved = {k: os.environ.get(k) for k in (*FAST_HEALTH, "RAY_ADDRESS")}
    os.environ.update(FAST_HEALTH)
    os.environ.pop("RAY_ADDRESS", None)
    store, c = 200 * 1024 ** 2, None
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "node_ip_address": LOOPBACK,
            "object_store_memory": store})
        nodes = {name: c.add_node(num_cpus=1, node_ip_address=LOOPBACK,
                                  object_store_memory=store) for name in ("a", "b")}
        c.wait_for_nodes()
        yield {"address": c.address, "cluster": c, "nodes": nodes,
               "env": {**os.environ, "PYTHONPATH": str(ROOT)}}
    finally:
        if c is not None:
            c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


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
        # node A: raylet, object store and workers killed at once
        cluster["cluster"].remove_node(cluster["nodes"]["a"], allow_graceful=False)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 0, err[-3000:]
    run = json.loads(Path(out, "run.json").read_text())
    assert run["counts"]["retries"] >= 1, err[-3000:]
    assert "retried after a lost worker or node" in err
    assert run["counts"]["units_computed"] == 8 and run["counts"]["images_read"] == 18

    # fault-free reference on the surviving node, other sharding (a driver of its own, as the
    # faulty run's)
    ref = str(tmp_path / "reference")
    done = subprocess.run([sys.executable, "-m", "jobs.analyze",
                           *argv_for(data, ref, "--shards", "3", "--workers", "1")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tables(tables_of(ref), tables_of(out))
