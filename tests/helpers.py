"""Small helpers shared by tests: free ports for Ray nodes, a local Ray on loopback, faults handed
to the engine through the work itself (a function or class that kills its own process), run.json
shape."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Iterator

LOOPBACK = "127.0.0.1"     # every Ray node a test starts listens here only (with conftest's env)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, store_mib: int = 200) -> Iterator[str]:
    """A real local Ray cluster for one test module; yields its GCS address. `address="local"`
    never joins a stale cluster; workers inherit the environment as it is now (start it after
    the S3 server so that they see its AWS_* variables)."""
    import ray

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=store_mib * 1024 ** 2, _node_ip_address=LOOPBACK,
             log_to_driver=False)        # as the jobs' init_ray: workers' output in Ray's logs
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# --- faults, handed in through the work the engine runs (picklable: Ray workers import them) ---

class Die:
    """The worker process exits hard (as if killed) when called with one of `keys`: once per key
    (a flag file under `flags` remembers it), or on every try with `always`."""

    def __init__(self, flags: str, keys: tuple, always: bool = False) -> None:
        self.flags, self.keys, self.always = flags, tuple(keys), always

    def __call__(self, key) -> None:
        if key not in self.keys:
            return
        flag = os.path.join(self.flags, str(key))
        if self.always or not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)


def slowed(cls: type, seconds: float) -> type:
    """`cls` (a Pool worker class) whose `run` sleeps `seconds` first, so that a test can kill
    something mid-run. Built at run time, so Ray ships it by value."""
    def run(self, *args):
        time.sleep(seconds)
        return cls.run(self, *args)

    return type(f"Slow{cls.__name__}", (cls,), {"run": run})


def dying_train_loop(flags: str, key: str, lc: dict) -> None:
    """jobs.trainer.train_loop whose worker exits hard once at `key`
    ("rank<r>-epoch<e>-batch<b>"): through Training.run_epoch's public `on_batch` callback.
    Tests pass `functools.partial(dying_train_loop, flags, key)` as jobs.trainer.train_loop."""
    import ray.train

    from jobs import trainer
    from pipeline.train.recipe import Training

    die, rank, run_epoch = Die(flags, (key,)), ray.train.get_context().get_world_rank(), \
        Training.run_epoch

    def run(self, epoch, *args, **kwargs):
        return run_epoch(self, epoch, *args, **kwargs,
                         on_batch=lambda i: die(f"rank{rank}-epoch{epoch}-batch{i}"))

    Training.run_epoch = run          # this training worker's process only
    trainer.train_loop(lc)


def assert_run_shape(run: dict) -> None:
    """What every job's run.json shares (the tests of every ported job call this)."""
    from jobs.runtime import runinfo

    assert set(run) == set(runinfo.TOP_LEVEL)
    assert set(runinfo.COUNTS) <= set(run["counts"])
    assert set(run["device"]) == {"kind", "name", "workers"}
    assert "total" in run["seconds"]
    assert set(run["seconds"]) == set(run["throughput"]) - {"unit", "units"}
    assert {"torch", "ray", "python"} <= set(run["versions"])
