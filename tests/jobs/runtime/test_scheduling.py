"""Shards on a real 3-node local cluster (ray.cluster_utils.Cluster: three raylets, one machine):
jobs.analyze's plan puts one worker on each node, its default shard count is a multiple of the
workers, and so no worker idles while shards remain: all three finish within one shard of each
other, each after the same number of shards. Plan.shards' arithmetic is checked on its own."""
from __future__ import annotations

import os
import time

import pytest

from jobs.runtime import engine
from jobs.runtime.device import Plan

SECONDS = 1.5           # every unit's work: equal shards take equal time, as on equal GPUs


class Shard:
    """A Pool worker standing in for the analysis actor: each unit takes SECONDS and reports
    where and when it ran (the node, the process, its start and end)."""

    def run(self, start: int, stop: int) -> engine.Result:
        import ray

        t0 = time.time()
        time.sleep(SECONDS)
        return engine.Result({}, {"node": ray.get_runtime_context().get_node_id(),
                                    "pid": os.getpid(), "start": t0, "end": time.time()})


@pytest.mark.parametrize("images, workers, shards", [
    (50_000, 8, 32), (50_000, 1, 25), (400, 1, 1), (400, 3, 3), (13_000, 3, 9), (5, 8, 5),
    (2000, 2, 2), (2001, 2, 2), (4001, 2, 4)])
def test_default_shards_are_a_multiple_of_the_workers(images, workers, shards):
    got = Plan(workers, {}, 1).shards(images)
    assert got == shards
    assert got % workers == 0 or got == images          # fewer images than workers: one each
    assert images / got <= 2000                        # shards of at most ~2000 images


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2})
    for _ in range(2):
        cluster.add_node(num_cpus=4, object_store_memory=100 * 1024 ** 2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_no_worker_idles_while_shards_remain(three_nodes, tmp_path):
    import ray

    device = engine.resolve_device("cpu")
    plan, _ = device.decode_plan()            # jobs.analyze's: one 4-CPU actor per node
    assert plan.workers == 3 and len([n for n in ray.nodes() if n["Alive"]]) == 3
    images = 12_000
    from jobs.runtime.device import SHARD_IMAGES
    from pipeline.data.listing import shard_ranges

    ranges = shard_ranges(images, shards=plan.shards(images))
    assert len(ranges) == 6 and all(b - a == SHARD_IMAGES for a, b in ranges)
    units = engine.range_units("shard-", ranges)
    stats = engine.run_units(units, engine.Pool(Shard, inflight=2),
                             engine.Store(str(tmp_path), "sched"), plan=plan)
    runs = [stats.infos[u.name] for u in units]
    by_worker: dict[int, list[dict]] = {}
    for r in runs:
        by_worker.setdefault(r["pid"], []).append(r)
    assert len(by_worker) == 3 and len({r["node"] for r in runs}) == 3   # one worker per node
    assert sorted(len(v) for v in by_worker.values()) == [2, 2, 2]
    last_end = [max(r["end"] for r in v) for v in by_worker.values()]
    # no worker finished while another still had a whole shard to go
    assert max(last_end) - min(last_end) < SECONDS
    # and none waited between its own shards (the next one was queued on it: inflight=2)
    for v in by_worker.values():
        v.sort(key=lambda r: r["start"])
        assert v[1]["start"] - v[0]["end"] < SECONDS / 2
