"""jobs.runtime.engine, jobs.runtime.options, jobs.runtime.runinfo and jobs.runtime.console on one real local Ray cluster.

Units run as tasks and on actor pools; a partial is trusted only with its marker and is never a
pickle; a rerun lists the folder once and resumes; merging ignores completion order; Ray retries
dead workers a bounded number of times (faults come in through the work itself); an actor whose
constructor fails stops the job with one line; the fingerprint moves with every ingredient; options
are declared once and round-trip through argv.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from jobs.runtime import device
from jobs.runtime import engine
from jobs.runtime.console import Progress
from jobs.runtime.engine import Pool, Result, Store, Task, Unit
from jobs.runtime.options import (BadInput, JobFailed, Options, at_least, bad_input, build_parser,
                                  opt, parse_config, run_cli)
from pipeline.results.state import StateError
from tests.helpers import Die, assert_run_shape, local_ray

PLAN = engine.Plan(2, {"num_cpus": 1}, 1)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(2, 200) as address:
        yield address


def square(offset: int, x: int) -> Result:
    return Result({"y": x * x + offset}, {"x": x})


def square_or_die(die: Die, offset: int, x: int) -> Result:
    die(x)                                 # the fault: this worker process exits hard
    return square(offset, x)


def add(a: dict, b: dict) -> dict:
    return {"y": a["y"] + b["y"]}


def fails(x: int) -> int:
    raise ZeroDivisionError(f"bad unit {x}")


class Squarer:
    """A Pool worker: state built once per actor (like a model), then one call per unit."""

    def __init__(self, offset: int, die: Die | None = None) -> None:
        self.offset, self.die = offset, die

    def run(self, x: int) -> Result:
        if self.die is not None:
            self.die(x)
        return square(self.offset, x)


class NoDevice:
    def __init__(self, offset: int) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")


def _units(n: int = 5) -> list[Unit]:
    return [Unit(f"u{i:02d}", (i,), size=i + 1) for i in range(n)]


# ------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("work", [Task(square, 10), Pool(Squarer, 10)], ids=["task", "pool"])
def test_units_run_partial_then_marker_then_resume(ray_cluster, tmp_path, work):
    store = Store(str(tmp_path), "fp1")
    bar = Progress("t: ", total=15, unit="items")
    run = engine.run_units(_units(), work, store, plan=PLAN, progress=bar)
    assert run.counts() == {"units": 5, "units_computed": 5, "units_resumed": 0, "retries": 0}
    assert bar.done == 15
    folder = tmp_path / "_partials" / "fp1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"u{i:02d}.state" for i in range(5)] + [f"u{i:02d}.done" for i in range(5)])
    for i in range(5):
        with np.load(folder / f"u{i:02d}.state", allow_pickle=False) as npz:   # plain .npz
            assert "$tree" in npz.files
        assert store.load(f"u{i:02d}") == {"y": i * i + 10}
        marker = json.loads((folder / f"u{i:02d}.done").read_text())
        assert marker["unit"] == f"u{i:02d}" and marker["x"] == i and marker["seconds"] >= 0

    # a partial without its marker (a worker died between the two writes) is recomputed
    (folder / "u03.done").unlink()
    (folder / "u03.state").write_bytes(b"torn")
    again = engine.run_units(_units(), work, store, plan=PLAN)
    assert again.counts() == {"units": 5, "units_computed": 1, "units_resumed": 4, "retries": 0}
    assert store.load("u03") == {"y": 19} and again.infos["u01"]["x"] == 1
    # everything done: not even a worker is started (a failing one would raise)
    done = engine.run_units(_units(), Task(fails), store, plan=PLAN)
    assert (done.computed, done.resumed) == (0, 5)


class Closing(Squarer):
    closed: list = []

    def close(self) -> None:
        Closing.closed.append(self.offset)


@pytest.mark.parametrize("work", [Task(square, 10), Pool(Closing, 10)], ids=["task", "pool"])
def test_units_run_here_write_what_ray_writes_and_resume(tmp_path, work):
    """here=True (no Ray): the same partials and markers, resume, and a Pool's object closed."""
    store = Store(str(tmp_path / "here"), "fp1")
    bar = Progress("t: ", total=15, unit="items")
    run = engine.run_units(_units(), work, store, plan=PLAN, progress=bar, here=True)
    assert run.counts() == {"units": 5, "units_computed": 5, "units_resumed": 0, "retries": 0}
    assert bar.done == 15
    for i in range(5):
        assert store.load(f"u{i:02d}") == {"y": i * i + 10} and run.infos[f"u{i:02d}"]["x"] == i
    assert not [p for p in (tmp_path / "here" / "_partials" / "fp1").iterdir()
                if p.name.startswith("_tries")]
    if isinstance(work, Pool):
        assert Closing.closed[-1] == 10
    (tmp_path / "here" / "_partials" / "fp1" / "u02.done").unlink()
    again = engine.run_units(_units(), work, store, plan=PLAN, here=True)
    assert (again.computed, again.resumed) == (1, 4) and store.load("u02") == {"y": 14}


def square_but_one(x: int) -> Result:
    if x == 1:
        raise ZeroDivisionError(f"bad unit {x}")
    return square(0, x)


def test_a_unit_error_here_keeps_its_traceback_and_the_units_before_it(tmp_path):
    store = Store(str(tmp_path), "fp")
    with pytest.raises(ZeroDivisionError, match="bad unit 1"):
        engine.run_units(_units(3), Task(square_but_one), store, plan=PLAN, here=True)
    assert store.finished() == {"u00"}                   # finished work persists
    again = engine.run_units(_units(3), Task(square, 0), store, plan=PLAN, here=True)
    assert (again.computed, again.resumed) == (2, 1)


def test_resume_lists_the_folder_once(ray_cluster, tmp_path, monkeypatch):
    """Finished units are found by one listing of <fingerprint>/, not one probe per unit."""
    import fsspec.implementations.local as local

    store = Store(str(tmp_path), "fp")
    engine.run_units(_units(), Task(square, 0), store, plan=PLAN)
    calls = {"ls": 0, "exists": 0}
    for name in calls:
        method = getattr(local.LocalFileSystem, name)
        monkeypatch.setattr(local.LocalFileSystem, name, lambda self, *a, _m=method, _n=name,
                            **k: (calls.__setitem__(_n, calls[_n] + 1), _m(self, *a, **k))[1])
    run = engine.run_units(_units(), Task(fails), store, plan=PLAN)
    assert run.resumed == 5 and calls == {"ls": 1, "exists": 0}


def test_a_planted_pickle_is_refused_and_never_run(ray_cluster, tmp_path):
    """Partials are data: a pickle planted where a partial lies is refused with the file's name,
    its code never runs; a stray .pkl (the old format) is not even read."""
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    store = Store(str(tmp_path), "fp")
    engine.run_units(_units(2), Task(square, 0), store, plan=PLAN)
    folder = tmp_path / "_partials" / "fp"
    (folder / "u01.state").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(StateError, match=r"u01\.state: not a partial state"):
        engine.merge(store, ["u00", "u01"], add)
    # an object array inside a real .npz is refused as well (np.load allow_pickle=False)
    import io

    buf = io.BytesIO()
    np.savez(buf, **{"$tree": np.frombuffer(b'{"y": {"$array": "a0"}}', np.uint8),
                     "a0": np.array([Evil()], dtype=object)})
    (folder / "u01.state").write_bytes(buf.getvalue())
    with pytest.raises(StateError):
        engine.merge(store, ["u00", "u01"], add)
    # the old format: <unit>.pkl with a marker but no .state is recomputed, never loaded
    (folder / "u01.state").unlink()
    (folder / "u01.pkl").write_bytes(pickle.dumps(Evil()))
    run = engine.run_units(_units(2), Task(square, 0), store, plan=PLAN)
    assert (run.resumed, run.computed) == (1, 1)
    assert engine.merge(store, run.names, add) == {"y": 1}
    assert not sentinel.exists()


def test_arrow_tables_are_partials_too(ray_cluster, tmp_path):
    def rows(x: int) -> pa.Table:
        return pa.table({"x": [x, x], "name": ["a", "b"]})

    store = Store(str(tmp_path), "fp")
    run = engine.run_units(_units(3), Task(rows), store, plan=PLAN)
    assert (tmp_path / "_partials" / "fp" / "u02.state").read_bytes()[:6] == b"ARROW1"
    merged = engine.merge(store, run.names, lambda a, b: pa.concat_tables([a, b]))
    assert merged.to_pydict() == {"x": [0, 0, 1, 1, 2, 2], "name": ["a", "b"] * 3}


def test_merge_ignores_order_and_tree_equals_fold(ray_cluster, tmp_path):
    store = Store(str(tmp_path), "fp")
    engine.run_units(_units(7), Task(square, 0), store, plan=PLAN)
    names = [f"u{i:02d}" for i in range(7)]
    concat = lambda a, b: (a if isinstance(a, list) else [a["y"]]) + [b["y"]]   # order-sensitive
    want = engine.merge(store, names, concat)
    assert want == [i * i for i in range(7)]                          # sorted unit order
    for seed in range(3):
        shuffled = random.Random(seed).sample(names, len(names))
        assert engine.merge(store, shuffled, concat) == want
    total = engine.merge(store, names, add)
    for fan_in in (2, 3, 8):
        assert engine.merge(store, names[::-1], add, fan_in=fan_in) == total


def test_dead_worker_is_retried_by_ray_then_bounded(ray_cluster, tmp_path):
    store = Store(str(tmp_path / "out"), "fp")
    die = Die(str(tmp_path), (1, 3))                   # units u01 and u03 die once each
    run = engine.run_units(_units(), Task(square_or_die, die, 0), store, plan=PLAN)
    assert run.retries == 2 and run.computed == 5
    assert [store.load(f"u{i:02d}")["y"] for i in range(5)] == [0, 1, 4, 9, 16]
    assert not list((tmp_path / "out" / "_partials" / "fp").glob("_tries*"))   # counted, removed

    flags = tmp_path / "always"
    flags.mkdir()
    with pytest.raises(JobFailed, match=r"^unit u02 failed 2 times; last error: .*") as e:
        engine.run_units(_units(), Task(square_or_die, Die(str(flags), (2,), always=True), 0),
                         Store(str(tmp_path / "o2"), "fp"), plan=PLAN, attempts=2)
    assert len(str(e.value).splitlines()) == 1


class Feeder:
    """A Pool worker that hears of units early (`feed`) and records what it saw."""

    def __init__(self) -> None:
        self.fed: list[int] = []
        self.ran: list[int] = []

    def feed(self, x: int) -> None:
        self.fed.append(x)

    def run(self, x: int) -> Result:
        import time

        time.sleep(0.3)                   # the next unit arrives while this one computes
        self.ran.append(x)
        return Result({"y": x}, {"fed": list(self.fed), "ran": list(self.ran)})


def test_pool_inflight_feeds_the_next_unit_early_and_computes_in_order(ray_cluster, tmp_path):
    with pytest.raises(ValueError, match="inflight"):
        Pool(Feeder, inflight=0)
    store = Store(str(tmp_path), "fp")
    one = engine.Plan(1, {"num_cpus": 1}, 1)
    run = engine.run_units(_units(6), Pool(Feeder, inflight=2), store, plan=one)
    assert run.computed == 6
    assert [store.load(f"u{i:02d}")["y"] for i in range(6)] == list(range(6))
    last = max(run.infos.values(), key=lambda i: len(i["ran"]))
    assert sorted(last["ran"]) == list(range(6)) and last["fed"] == last["ran"]   # same order
    for info in run.infos.values():
        ran, fed = info["ran"], info["fed"]
        assert fed[:len(ran)] == ran                          # computed in the order fed
        if len(ran) < 6:
            assert len(fed) == len(ran) + 1                   # the next one fed while computing


@pytest.mark.parametrize("inflight", [1, 2])
def test_actor_pool_survives_a_dead_actor(ray_cluster, tmp_path, inflight):
    """Ray restarts the actor (max_restarts) and retries its units (max_task_retries)."""
    store = Store(str(tmp_path / "out"), "fp")
    work = Pool(Squarer, 1, Die(str(tmp_path), (2,)), inflight=inflight)
    run = engine.run_units(_units(), work, store, plan=PLAN)
    assert run.retries >= 1 and run.computed == 5          # u02, and what shared its actor
    assert (tmp_path / "2").exists()                        # it really died
    assert engine.merge(store, run.names, add) == {"y": sum(i * i + 1 for i in range(5))}


def test_unit_exception_keeps_its_traceback_and_is_not_retried(ray_cluster, tmp_path):
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="bad unit") as e:
        engine.run_units([Unit("a", (1,))], Task(fails), Store(str(tmp_path), "fp"), plan=PLAN)
    assert isinstance(e.value.cause, ZeroDivisionError)
    # unless the job names it as transient (e.g. an OSError from object storage)
    with pytest.raises(JobFailed, match="^unit a failed 2 times; last error: ZeroDivisionError"):
        engine.run_units([Unit("a", (1,))], Task(fails), Store(str(tmp_path), "fp"),
                         plan=PLAN, retry_on=(ZeroDivisionError,), attempts=2)


def test_actor_constructor_failure_stops_the_job_with_one_line(ray_cluster, tmp_path, capsys):
    @dataclass(frozen=True)
    class Cfg(Options):
        out: str = opt(str(tmp_path / "out"), "output")

    def body(cfg: Cfg) -> None:
        engine.run_units(_units(), Pool(NoDevice, 0), Store(cfg.out, "fp"), plan=PLAN)

    with pytest.raises(SystemExit) as e:
        run_cli("python -m jobs.x", None, Cfg, body, [])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("python -m jobs.x: error: no worker could start; last error: "
                       "RuntimeError: CUDA error: no CUDA-capable device is detected"), err
    assert not (tmp_path / "out").exists()


def test_fingerprint_moves_with_every_ingredient(monkeypatch):
    import torch

    cpu = engine.Device("cpu", "x86_64", 0, 2)
    base = engine.fingerprint({"steps": 31}, b"weights", device=cpu)
    assert base == engine.fingerprint({"steps": 31}, b"weights", device=cpu)
    others = [
        engine.fingerprint({"steps": 30}, b"weights", device=cpu),
        engine.fingerprint({"steps": 31}, b"weight5", device=cpu),
        engine.fingerprint({"steps": 31}, b"weights", device=dataclasses.replace(cpu, kind="cuda")),
        engine.fingerprint({"steps": 31}, b"weights", device=dataclasses.replace(cpu, name="arm")),
        engine.fingerprint({"steps": 31}, b"weights", device=dataclasses.replace(cpu, cudnn=90100)),
    ]
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    others.append(engine.fingerprint({"steps": 31}, b"weights", device=cpu))
    monkeypatch.undo()
    monkeypatch.setattr(device, "code_version", lambda: "edited")
    others.append(engine.fingerprint({"steps": 31}, b"weights", device=cpu))
    monkeypatch.undo()
    from pipeline.models import precision

    flags = precision.current()   # restored as a whole: the legacy setter moves the new API too
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if old != "medium" else "high")
        others.append(engine.fingerprint({"steps": 31}, b"weights", device=cpu))
    finally:
        precision.restore(flags)
    assert precision.current() == flags
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)
    others.append(engine.fingerprint({"steps": 31}, b"weights", device=cpu))
    assert len({base, *others}) == len(others) + 1
    w = {"a": torch.zeros(2)}
    assert engine.digest(w) != engine.digest({"a": torch.ones(2)}) != engine.digest({"b": w["a"]})


def test_device_plan():
    cpu = engine.Device("cpu", "x86_64", 0, 16)
    assert cpu.plan(None, cpus_per_worker=8) == engine.Plan(2, {"num_cpus": 8}, 8)
    assert cpu.plan(4) == engine.Plan(4, {"num_cpus": 4}, 4)
    gpu = engine.Device("cuda", "H200", 8, 64)
    assert gpu.plan(None) == engine.Plan(8, {"num_gpus": 1, "num_cpus": 1}, 1)
    # two 1-CPU nodes: one worker may not ask for both CPUs (it could never be placed)
    split = engine.Device("cpu", "x86_64", 0, 2, node_cpus=1)
    assert split.plan(1) == engine.Plan(1, {"num_cpus": 1}, 1)
    assert split.share(1) == 1 and cpu.share(1) == 16


def test_decode_and_task_plans():
    cpu = engine.Device("cpu", "x86_64", 0, 16)
    # 4 actors of 4 CPUs: one decodes, three compute
    assert cpu.decode_plan() == (engine.Plan(4, {"num_cpus": 4}, 3), 1)
    assert cpu.decode_plan(1) == (engine.Plan(1, {"num_cpus": 16}, 12), 4)
    gpu = engine.Device("cuda", "H200", 8, 128)
    assert gpu.decode_plan() == (engine.Plan(8, {"num_gpus": 1, "num_cpus": 8}, 1), 8)
    assert gpu.decode_plan(2) == (engine.Plan(2, {"num_gpus": 1, "num_cpus": 8}, 1), 8)
    assert cpu.task_plan(0, 3) == engine.Plan(5, {"num_cpus": 3, "num_gpus": 0}, 1)
    assert gpu.task_plan(0.5, 1) == engine.Plan(16, {"num_cpus": 1, "num_gpus": 0.5}, 1)
    assert cpu.task_plan(0, 64) == engine.Plan(1, {"num_cpus": 64, "num_gpus": 0}, 1)


def test_range_units_name_args_and_size():
    units = engine.range_units("evaluate-all-", [(0, 64), (64, 100)], "plans", weight=3)
    assert units == [Unit("evaluate-all-000000000-000000064", ("plans", 0, 64), 192),
                     Unit("evaluate-all-000000064-000000100", ("plans", 64, 100), 108)]
    assert [u.name for u in units] == sorted(u.name for u in units)    # name order = image order
    assert engine.range_units("shard-", [(5, 9)]) == [Unit("shard-000000005-000000009", (5, 9), 4)]


def test_resolve_device_knows_the_largest_node(ray_cluster):
    import ray

    largest = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    assert engine.resolve_device("cpu").node_cpus == largest


def test_cuda_on_a_cpu_cluster_is_bad_input(ray_cluster):
    with pytest.raises(BadInput, match="no GPU; use auto or cpu"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").kind == "cpu"


# ----------------------------------------------------------------------------------- options
def _kinds() -> list[str]:
    return ["a", "b"]


@dataclass(frozen=True)
class Demo(Options):
    out: str = opt(help="where to write")
    steps: int = opt(31, "optimiser steps", check=at_least(1), decides=True)
    size: int | None = opt(None, "side in pixels", check=at_least(16))
    kind: str = opt("a", "which kind", choices=_kinds)
    crop: bool = opt(True, "do not crop", flag="--no-crop")
    fast: bool = opt(False, "go fast")
    scale: tuple = opt((), "factors, e.g. 0.9,1.1",
                       parse=lambda s: tuple(float(v) for v in s.split(",")), decides=True)
    tags: tuple[str, ...] = opt((), "a tag; repeatable", flag="--tag")
    sync: bool | None = opt(None, "synchronise (default: decide later)")

    def check(self) -> None:
        if self.fast and self.steps > 100:
            raise BadInput("--fast allows at most 100 --steps")


def test_options_declared_once_drive_cli_and_dataclass(capsys):
    defaults = parse_config(Demo, ["--out", "x"], "prog")
    assert defaults == Demo(out="x")                     # the CLI's defaults are the dataclass's
    full = parse_config(Demo, ["--out", "x", "--steps", "5", "--size", "32", "--kind", "b",
                               "--no-crop", "--fast", "--scale", "0.9,1.1", "--tag", "p",
                               "--tag", "q", "--sync"], "prog")
    assert full == Demo("x", 5, 32, "b", False, True, (0.9, 1.1), ("p", "q"), True)
    assert parse_config(Demo, ["--out", "x", "--no-sync"], "prog").sync is False
    text = build_parser(Demo, "prog", "doc").format_help()
    for f in dataclasses.fields(Demo):
        assert f.metadata["opt"].help in " ".join(text.split())
    assert "--no-crop" in text and "(default: 31)" in text and "--no-sync" in text
    # one check, whichever door the value comes in by
    for bad, message in ((dict(steps=0), "--steps must be >= 1, got 0"),
                         (dict(size=8), "--size must be >= 16, got 8"),
                         (dict(kind="c"), "invalid --kind 'c'; allowed: a, b"),
                         (dict(fast=True, steps=200), "--fast allows at most 100 --steps")):
        with pytest.raises(BadInput) as e:
            Demo(out="x", **bad)
        assert str(e.value) == message
        argv = ["--out", "x"] + [t for k, v in bad.items()
                                 for t in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
        with pytest.raises(SystemExit) as e:
            run_cli("prog", None, Demo, lambda cfg: None, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"prog: error: {message}"], err


def test_argv_gives_back_the_config_and_decisive_holds_what_decides():
    cfg = Demo(out="x y", steps=5, crop=False, scale=(0.9, 1.1), tags=("p", "q"), sync=False)
    assert cfg.argv() == ["--out", "x y", "--steps", "5", "--no-crop", "--scale", "0.9,1.1",
                          "--tag", "p", "--tag", "q", "--no-sync"]
    assert parse_config(Demo, cfg.argv(), "prog") == cfg
    assert Demo(out="x").argv() == ["--out", "x"]
    assert cfg.decisive() == {"steps": 5, "scale": (0.9, 1.1)}
    cpu = engine.Device("cpu", "x86_64", 0, 2)
    same = dataclasses.replace(cfg, out="elsewhere", kind="b", tags=())   # not decides=True
    assert engine.fingerprint(same, device=cpu) == engine.fingerprint(cfg, device=cpu)
    assert engine.fingerprint(dataclasses.replace(cfg, steps=6), device=cpu) != \
        engine.fingerprint(cfg, device=cpu)


def test_every_job_parses_its_own_argv_and_keeps_a_short_usage_line():
    """Each job's Config round-trips through argv() (jobs.reproduce's rerun commands), and its
    usage line names options, not the 70 model names (they are checked, not listed)."""
    import importlib

    from jobs.runtime.inputs import model_choices

    for name in ("analyze", "ablate", "actmax", "bench", "neuron_types", "train", "report",
                 "receptive_fields", "demo_data", "reproduce"):
        job = importlib.import_module(f"jobs.{name}")
        cls = next(v for k, v in vars(job).items() if isinstance(v, type)
                   and issubclass(v, Options) and v is not Options and v.__module__ == job.__name__)
        usage = build_parser(cls, job.PROG, job.__doc__).format_usage()
        assert "resnet152" not in usage and "densenet121" not in usage, (name, usage)
        assert usage.startswith(f"usage: {job.PROG} ") and usage.strip().endswith("[options]")
        assert len(usage.splitlines()) == 1, (name, usage)
        required = {"out": "o"} if any(f.name == "out" and f.default is dataclasses.MISSING
                                       for f in dataclasses.fields(cls)) else {}
        cfg = cls(**required, **({"sources_from": ("r",)} if name == "neuron_types" else {}))
        assert parse_config(cls, cfg.argv(), job.PROG) == cfg, name
    from jobs import bench

    assert "densenet121" in bench.Config.__dataclass_fields__["model"].metadata["opt"].choices()
    with pytest.raises(BadInput, match="invalid --model 'resnet35'; allowed: alexnet, "):
        bench.Config(model="resnet35")
    assert set(model_choices()) >= {"resnet34", "plainnet34", "vgg16"}


def test_only_bad_input_becomes_exit_2(capsys):
    def bug(cfg):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):       # traceback kept
        run_cli("prog", None, Demo, bug, ["--out", "x"])

    def bad(cfg):
        raise BadInput("data source x holds no images\nsecond line")

    with pytest.raises(SystemExit) as e:
        run_cli("prog", None, Demo, bad, ["--out", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "prog: error: data source x holds no images\n"
    assert run_cli("prog", None, Demo, lambda cfg: None, ["--out", "x"]) == 0


def test_bad_input_turns_the_named_errors_into_bad_input():
    with pytest.raises(BadInput) as e:
        with bad_input(prefix="--from x: "):
            raise ValueError("no rows\nsecond line")
    assert str(e.value) == "--from x: no rows\nsecond line" and e.value.__cause__ is None
    with pytest.raises(BadInput, match="^missing.parquet$"):
        with bad_input(ValueError, FileNotFoundError, first_line=True):
            raise FileNotFoundError("missing.parquet\nmore")
    with pytest.raises(BadInput, match="^KeyError$"):
        with bad_input(KeyError, first_line=True):
            raise KeyError()
    with pytest.raises(TypeError):                                      # not named: a bug
        with bad_input():
            raise TypeError("a real bug")


def test_progress_line_has_rate_and_eta():
    bar = Progress("actmax: ", total=100, unit="channels", done=20)
    bar.t0 -= 10.0                      # 10 s ago, 20 resumed: they do not count in the rate
    bar.done = 60
    line = bar.line()
    assert line.startswith("actmax: 60/100 channels, 4 channels/s, ETA 0:10"), line


# ---------------------------------------------------------------------------------- run.json
def test_run_report_shape_and_throughput():
    from jobs.runtime.runinfo import run_report

    run = run_report("x", {"a": 1}, counts={"units": 2, "channels": 8},
                     seconds={"optimize": 2.0, "write": 0.5}, total_seconds=4.0, work=8,
                     unit="channels", stage_work={"write": 2},
                     skipped=[{"image_index": 3, "path": "a.JPEG", "reason": "truncated"}])
    assert_run_shape(run)
    assert run["throughput"] == {"unit": "channels", "optimize": 4.0, "write": 4.0, "total": 2.0}
    assert run["counts"]["images_skipped"] == 1 and run["counts"]["units_resumed"] == 0
    assert run["seconds"] == {"optimize": 2.0, "write": 0.5, "total": 4.0}


def test_markers_of_several_runs_count_skip_once_and_list_distinct_precision():
    from pipeline.models.precision import setting
    from jobs.runtime.runinfo import Markers

    strict, tf32 = {"matmul": "ieee", "cudnn": False}, {"cudnn": True, "matmul": "tf32"}
    census = engine.RunStats(["c-1", "c-0"], computed=1, resumed=1, infos={
        "c-0": {"skipped": [[9, "b.JPEG", "truncated"]], "precision": strict},
        "c-1": {"skipped": [[2, "a.JPEG", "empty"]], "precision": tf32}})
    evaluate = engine.RunStats(["e-0"], computed=1, retries=2, infos={
        "e-0": {"skipped": [[9, "b.JPEG", "truncated"], [2, "a.JPEG", "empty"]],
                "precision": dict(reversed(strict.items()))}})
    m = Markers.of(census, evaluate)
    assert m.counts == {"units": 3, "units_computed": 2, "units_resumed": 1, "retries": 2}
    assert m.infos == [census.infos["c-1"], census.infos["c-0"], evaluate.infos["e-0"]]
    assert m.skipped() == [{"image_index": 2, "path": "a.JPEG", "reason": "empty"},
                           {"image_index": 9, "path": "b.JPEG", "reason": "truncated"}]
    assert m.precision() == {**setting(), "workers": [tf32, strict]}     # unit order, once each
    assert Markers.of(engine.RunStats([])).skipped() == []


def test_quiet_ray_log_goes_to_a_file(tmp_path):
    import logging

    from jobs.runtime.console import _quiet_ray_logger

    logger = logging.getLogger("ray")
    saved = [(h, h.level) for h in logger.handlers]
    path = tmp_path / "out" / "_logs" / "ray.log"
    try:
        _quiet_ray_logger(str(path))
        assert not path.parent.exists()               # created only when a record arrives
        consoles = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)]
        assert consoles and all(h.level == logging.ERROR for h in consoles)   # errors still show
        logger.warning("token authentication is enabled")
    finally:
        for h in logger.handlers[:]:
            if (h, h.level) not in saved and getattr(h, "baseFilename", None):
                logger.removeHandler(h)
                h.close()
        for h, level in saved:
            h.setLevel(level)
    assert "token authentication is enabled" in path.read_text()


def test_code_version_covers_every_subpackage(tmp_path):
    """An edit anywhere in pipeline/ or jobs/ (stage packages included) moves the fingerprint."""
    import shutil
    from pathlib import Path

    root = Path(device.__file__).resolve().parents[2]
    for d in ("pipeline", "jobs"):
        shutil.copytree(root / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    assert device.source_hash(tmp_path) == device.code_version()
    before = device.source_hash(tmp_path)
    with open(tmp_path / "pipeline" / "stats" / "accumulators.py", "a") as f:
        f.write("\n# edited\n")
    assert device.source_hash(tmp_path) != before
