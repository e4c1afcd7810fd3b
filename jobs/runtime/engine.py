"""The one shard engine: units of work, a partial then its marker, resume, Ray's own retries, merge.

    device = resolve_device(cfg.device)                  # after init_ray(); BadInput if no GPU
    plan = device.plan(cfg.workers or None, cpus_per_worker=8)
    store = Store(cfg.out, fingerprint(cfg, weights_digest, device=device))
    units = [Unit("conv3-00000-00063", (layer, chans), size=64), ...]
    units = range_units("shard-", shard_ranges(n, shards=64))   # shard-000000000-000002000 ...
    run = run_units(units, Task(fn, model), store, plan=plan, progress=bar)   # simple jobs
    run = run_units(units, Pool(ShardWorker, blob), store, plan=plan)        # model held by actors
    table = merge(store, run.names, combine)             # in unit order: completion order never matters

A unit is a named piece of work (a shard of images, a chunk of channels, an ablation plan). Its
worker computes a value and the engine writes it to `<name>.state`, THEN writes `<name>.done`
(JSON: the unit's small info, e.g. images read and skipped, so counts need no partial read). A
value is a state (a dict of numpy arrays and JSON values: `pipeline.results.state`) or a pyarrow
Table (Arrow IPC); nothing is pickled, and loading a partial runs no code. A rerun with the same
fingerprint lists the folder once and skips every unit that has its marker (`run.resumed`); a
partial without a marker is never trusted. The fingerprint hashes the options declared
`decides=True` and the resolved inputs together with the code version, the device kind and name,
the torch/cuDNN versions and the float precision settings, so a change to any of them starts
afresh in a new folder.

`Task(fn, *shared)`: one Ray task per unit, `fn(*shared, *unit.args)`; shared arguments (a model)
are `ray.put` once. `Pool(cls, *init_args)`: long-lived actors, `cls(*init_args)` once per actor
(load the model there), then `obj.run(*unit.args)` per unit. A worker returns a value, or
`Result(value, info)` to record `info` in the marker.

Failures are Ray's to handle: a task runs with `max_retries` (and `retry_exceptions` for the
exception types in `retry_on`), an actor with `max_restarts` and `max_task_retries`, all
`attempts - 1`; Ray re-runs a unit whose worker process, actor or node died (a restarted actor is
rebuilt from the same arguments: `_Host`). When Ray gives up, the job stops with one line naming the unit
and the error (JobFailed, exit 1); an exception raised by the unit's own code and not in
`retry_on` ends the job at once with its traceback (a bug or bad data: retrying would repeat
it). An actor whose constructor raises stops the job with one line. Each try of a unit leaves a
tiny record under the store, so `run.retries` counts Ray's retries. An actor with no unit left is
released at once, so a restarted one can take its place on a full cluster.

Tests inject faults through the work they hand in (a function or class that kills its own
process); nothing here knows about tests. Ray lives only here and in jobs/; the workers' code
comes from pipeline/.
"""
from __future__ import annotations

import functools
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from jobs.runtime.console import Progress, log
from jobs.runtime.device import Device, Plan, code_version, digest, fingerprint, resolve_device
from jobs.runtime.options import JobFailed

__all__ = ["Unit", "range_units", "Result", "Task", "Pool", "Store", "RunStats", "Device", "Plan",
           "resolve_device", "fingerprint", "digest", "code_version", "run_units", "merge"]


# ------------------------------------------------------------------------------- the pieces
@dataclass(frozen=True)
class Unit:
    name: str                 # unique, file-name safe; partials are merged in name order
    args: tuple = ()          # what the worker receives after the shared arguments
    size: int = 1             # progress items it stands for (images, channels)


def range_units(prefix: str, ranges: Sequence[tuple[int, int]], *head: Any,
                weight: int = 1) -> list[Unit]:
    """A unit per image range [a, b): named `<prefix><a:09d>-<b:09d>` (name order is image
    order), args `(*head, a, b)`, size `(b - a) * weight` (e.g. images times plans)."""
    return [Unit(f"{prefix}{a:09d}-{b:09d}", (*head, a, b), (b - a) * weight) for a, b in ranges]


@dataclass
class Result:
    value: Any                               # goes to the partial (<name>.state)
    info: dict = field(default_factory=dict)  # goes to the marker (<name>.done), JSON


@dataclass(frozen=True)
class Task:
    fn: Callable
    shared: tuple = ()

    def __init__(self, fn: Callable, *shared: Any) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "shared", shared)


@dataclass(frozen=True)
class Pool:
    """Long-lived actors. `inflight` > 1: each actor holds up to that many units at once and
    computes them in the order they reached it; a worker with a `feed(*args)` method hears of
    each unit as soon as it arrives (while the previous one computes), so it can start reading
    the next unit's input early (jobs.analyze: one decode pipeline runs across shards)."""

    cls: type
    init_args: tuple = ()
    inflight: int = 1

    def __init__(self, cls: type, *init_args: Any, inflight: int = 1) -> None:
        if inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {inflight}")
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "init_args", init_args)
        object.__setattr__(self, "inflight", int(inflight))


_ARROW = b"ARROW1"          # the magic bytes of an Arrow IPC file


def _dumps(value: Any) -> bytes:
    """A partial's bytes: an Arrow IPC file for a table, else a state's .npz (no pickle)."""
    import pyarrow as pa

    from pipeline.results.state import to_npz_bytes

    if not isinstance(value, pa.Table):
        return to_npz_bytes(value)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, value.schema) as writer:
        writer.write_table(value)
    return sink.getvalue().to_pybytes()


def _loads(data: bytes) -> Any:
    """The value `_dumps` wrote; StateError for anything else (a pickle runs no code here)."""
    import pyarrow as pa

    from pipeline.results.state import from_npz_bytes

    if data[:len(_ARROW)] == _ARROW:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
    return from_npz_bytes(data)


@dataclass(frozen=True)
class Store:
    """Partials of one fingerprint under `<out>/_partials/<fingerprint>/` (local or s3://)."""

    out: str
    fingerprint: str

    @property
    def url(self) -> str:
        from pipeline.results.tables import join

        return join(self.out, "_partials", self.fingerprint)

    def _file(self, name: str, ext: str) -> str:
        from pipeline.results.tables import join

        return join(self.url, f"{name}.{ext}")

    def finished(self) -> set[str]:
        """The units whose partial and marker are both there: one listing of the folder, not
        one probe per unit."""
        from pipeline.results.tables import fs_path

        fs, path = fs_path(self.url)
        try:
            files = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)}
        except FileNotFoundError:
            return set()
        return {f[:-len(".done")] for f in files
                if f.endswith(".done") and f[:-len(".done")] + ".state" in files}

    def info(self, name: str) -> dict:
        from pipeline.results.tables import read_json

        return read_json(self._file(name, "done"))

    def save(self, name: str, value: Any, info: dict) -> None:
        from pipeline.results.tables import write_bytes, write_json

        write_bytes(self._file(name, "state"), _dumps(value))
        write_json(self._file(name, "done"), info)        # the marker comes last

    def load(self, name: str) -> Any:
        """The partial of `name`; StateError (naming the file) for anything but a state or an
        Arrow table: a planted pickle is refused, never run."""
        from pipeline.results.state import StateError
        from pipeline.results.tables import read_bytes

        url = self._file(name, "state")
        try:
            return _loads(read_bytes(url))
        except StateError as e:
            raise StateError(f"{url}: {e}") from None

    def tried(self, name: str, run: str) -> None:
        """Record one try of unit `name` in run `run` (the worker calls it before computing)."""
        from pipeline.results.tables import join, write_bytes

        write_bytes(join(self.url, f"_tries-{run}", f"{name}.{uuid.uuid4().hex[:8]}"), b"")

    def tries(self, run: str) -> Counter:
        """Tries per unit name recorded by run `run`; the records are removed."""
        from pipeline.results.tables import fs_path, join

        fs, path = fs_path(join(self.url, f"_tries-{run}"))
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return Counter()
        fs.rm(path, recursive=True)
        return Counter(n.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for n in names)

    def clear(self) -> None:
        from pipeline.results.tables import exists, remove

        if exists(self.url):
            remove(self.url, recursive=True)


@dataclass
class RunStats:
    names: list[str]                          # every unit, in the order given
    computed: int = 0
    resumed: int = 0
    retries: int = 0
    infos: dict[str, dict] = field(default_factory=dict)   # unit name -> marker info

    def counts(self) -> dict[str, int]:
        """The run report's unit counts."""
        return {"units": len(self.names), "units_computed": self.computed,
                "units_resumed": self.resumed, "retries": self.retries}


# ------------------------------------------------------------------------------ worker side
def _execute(call: Callable, unit: Unit, store: Store, run: str) -> dict:
    store.tried(unit.name, run)
    t = time.perf_counter()
    out = call(*unit.args)
    value, info = (out.value, out.info) if isinstance(out, Result) else (out, {})
    info = {"unit": unit.name, "seconds": round(time.perf_counter() - t, 3), **info}
    store.save(unit.name, value, info)
    return info


def _task(fn: Callable, unit: Unit, store: Store, run: str, *shared: Any) -> dict:
    return _execute(functools.partial(fn, *shared), unit, store, run)


class _Host:
    """The actor around a Pool's class: builds it once, runs units, persists their partials.

    The class's arguments come with every call as a reference the driver holds for the whole
    run (`init`: a one-item list, so Ray does not fetch it per call), and the object is built
    from them on the first call (`ready`, else the first `run` of a restarted actor): Ray rebuilds
    a lost actor with its constructor arguments, and those must not live in the object store.

    With several units in flight (a threaded actor) the calls may start in any order: each takes
    a ticket on arrival, feeds its unit (`obj.feed`) at once and computes when its ticket is
    next, so units are fed and computed in the same order. A restarted actor starts counting
    afresh, whatever the units Ray retries on it."""

    def __init__(self, cls: type, store: Store, run: str):
        import threading

        self.cls, self.obj, self.store, self.run_id = cls, None, store, run
        self.turn = threading.Condition()
        self.arrived = self.ran = 0

    def _build(self, init: list) -> None:
        import ray

        if self.obj is None:
            self.obj = self.cls(*ray.get(init[0]))

    def ready(self, init: list) -> bool:
        with self.turn:
            self._build(init)
        return True

    def run(self, unit: Unit, init: list) -> dict:
        with self.turn:
            self._build(init)
            ticket, self.arrived = self.arrived, self.arrived + 1
            if hasattr(self.obj, "feed"):
                self.obj.feed(*unit.args)
            self.turn.wait_for(lambda: self.ran == ticket)
        try:
            return _execute(self.obj.run, unit, self.store, self.run_id)
        finally:
            with self.turn:
                self.ran += 1
                self.turn.notify_all()


# ------------------------------------------------------------------------------ driver side
def _last_error_line(e: BaseException) -> str:
    """The `SomeError: message` line of a (remote) traceback, else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Exit"))
            and " " not in ln.split(":")[0]]
    return errs[-1] if errs else (lines[0] if lines else type(e).__name__)


class _Workers:
    """Ray tasks or actors with Ray's retry options; `call(actor, unit)` submits a unit."""

    def __init__(self, work: Task | Pool, store: Store, plan: Plan, attempts: int,
                 retry_on: tuple, run: str, units: int) -> None:
        import ray

        self.ray, self.slots = ray, 1 if isinstance(work, Task) else work.inflight
        retry = {"retry_exceptions": list(retry_on)} if retry_on else {}
        if isinstance(work, Task):
            task = ray.remote(_task).options(max_retries=attempts - 1, **retry, **plan.resources)
            shared = tuple(ray.put(s) for s in work.shared)
            self.actors: list[Any] = [None] * plan.workers
            self.call = lambda a, u: task.remote(work.fn, u, store, run, *shared)
        else:
            host = ray.remote(_Host).options(max_restarts=attempts - 1,
                                             max_task_retries=attempts - 1,
                                             max_concurrency=self.slots, **plan.resources)
            # held for the whole run: every call (a retried one too) names these same arguments
            self.init = [ray.put(work.init_args)]
            self.actors = [host.remote(work.cls, store, run)
                           for _ in range(min(plan.workers, units))]
            self.call = lambda a, u: a.run.options(**retry).remote(u, self.init)
        self.load = {i: 0 for i in range(len(self.actors))}
        # actors not built yet: a long wait for them means the cluster lacks resources
        self.starting = {a.ready.remote(self.init): i for i, a in enumerate(self.actors)
                         if a is not None}
        self.resources = plan.resources

    def fill(self, pending: deque, running: dict) -> None:
        """Hand out units round by round, so that a small job spreads over every worker."""
        for level in range(self.slots):
            for i in list(self.load):
                if pending and self.load[i] <= level:
                    u = pending.popleft()
                    running[self.call(self.actors[i], u)] = (i, u)
                    self.load[i] += 1

    def started(self, ref: Any, attempts: int, retry_on: tuple) -> None:
        """An actor's `ready` came back: built, or the job stops with one line."""
        self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:      # the worker's class refused
            raise JobFailed(f"no worker could start; last error: "
                            f"{_last_error_line(e)}") from None
        except self.ray.exceptions.RayError as e:
            _stop(None, e, attempts, retry_on)

    def release_idle(self, pending: deque) -> None:
        """No unit left for an idle actor: give its resources back (a restarted actor of a lost
        node may be waiting for them)."""
        for i in [i for i, n in self.load.items() if n == 0 and not pending]:
            if self.actors[i] is not None:
                self.ray.kill(self.actors[i], no_restart=True)
            del self.load[i]

    def close(self) -> None:
        for a in self.actors:
            if a is not None:
                self.ray.kill(a, no_restart=True)


def _stop(u: Unit | None, e: BaseException, attempts: int, retry_on: tuple) -> None:
    """Raise what a unit's (or, `u` None, a worker's start's) final failure means for the job
    (module docstring)."""
    import ray

    line = _last_error_line(e)
    if isinstance(e, ray.exceptions.RayActorError) and e.actor_init_failed:
        raise JobFailed(f"no worker could start; last error: {line}") from None
    if isinstance(e, ray.exceptions.RayTaskError) and not isinstance(e.cause, retry_on):
        raise e                                    # the unit's own error: its traceback
    what = f"unit {u.name}" if u is not None else "a worker's start"
    raise JobFailed(f"{what} failed {attempts} times; last error: {line}") from None


def _dispatch(todo: list[Unit], workers: _Workers, stats: RunStats, attempts: int,
              retry_on: tuple, progress: Progress | None,
              on_done: Callable | None) -> None:
    ray, pending, running = workers.ray, deque(todo), {}
    while pending or running:
        workers.fill(pending, running)
        done, _ = ray.wait([*running, *workers.starting], num_returns=1, timeout=30.0)
        if not done and workers.starting:
            log(f"waiting for {len(workers.starting)} worker(s) to be placed: does the cluster "
                f"have the CPUs/GPUs they ask for ({workers.resources})?")
        for ref in done:
            if ref in workers.starting:
                workers.started(ref, attempts, retry_on)
                continue
            i, u = running.pop(ref)
            workers.load[i] -= 1
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as e:
                for ready in [r for r, j in workers.starting.items() if j == i]:
                    workers.started(ready, attempts, retry_on)   # a build failure says so
                _stop(u, e, attempts, retry_on)
            _finished(u, info, stats, progress, on_done)
        workers.release_idle(pending)


def _finished(u: Unit, info: dict, stats: RunStats, progress: Progress | None,
              on_done: Callable | None) -> None:
    """A unit's partial and marker are written: count it, report it."""
    stats.computed += 1
    stats.infos[u.name] = info
    if progress is not None:
        progress.update(u.size)
    if on_done is not None:
        on_done(u, info)


def _run_here(todo: list[Unit], work: Task | Pool, store: Store, run: str, stats: RunStats,
              progress: Progress | None, on_done: Callable | None) -> None:
    """Every unit in this process, in order, through the same partial-then-marker path (a
    Pool's object built once). No retries: an error ends the job with its traceback, and a
    rerun resumes from the units already done."""
    obj = None if isinstance(work, Task) else work.cls(*work.init_args)
    call = functools.partial(work.fn, *work.shared) if obj is None else obj.run
    try:
        for u in todo:
            _finished(u, _execute(call, u, store, run), stats, progress, on_done)
    finally:
        if hasattr(obj, "close"):
            obj.close()


def run_units(units: Sequence[Unit], work: Task | Pool, store: Store, *, plan: Plan,
              resume: bool = True, attempts: int = 3,
              retry_on: tuple[type[BaseException], ...] = (), progress: Progress | None = None,
              on_done: Callable[[Unit, dict], None] | None = None,
              here: bool = False) -> RunStats:
    """Compute every unit without a marker (module docstring); returns counts and marker infos.
    `here`: in this process, one unit after the other, without Ray (`_run_here`; for a job
    with no cluster whose units one worker would run anyway: console.no_cluster)."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be unique")
    stats, done = RunStats(names), store.finished() if resume else set()
    todo = []
    for u in units:
        if u.name in done:
            stats.infos[u.name] = store.info(u.name)
            stats.resumed += 1
            if progress is not None:
                progress.done += u.size
                progress.start_done += u.size
        else:
            todo.append(u)
    if not todo:
        return stats
    run = uuid.uuid4().hex[:12]
    if here:
        _run_here(todo, work, store, run, stats, progress, on_done)
        store.tries(run)                              # the try records go: nothing was retried
        return stats
    workers = _Workers(work, store, plan, attempts, retry_on, run, len(todo))
    try:
        _dispatch(todo, workers, stats, attempts, retry_on, progress, on_done)
    finally:
        workers.close()
        stats.retries = sum(n - 1 for n in store.tries(run).values() if n > 1)
    if stats.retries:
        log(f"{stats.retries} unit tr{'y was' if stats.retries == 1 else 'ies were'} retried "
            "after a lost worker or node (Ray's retries); the results are complete")
    return stats


def _fold(store: Store, names: list[str], combine: Callable) -> Any:
    return functools.reduce(combine, (store.load(n) for n in names))


def _combine(combine: Callable, *values: Any) -> Any:
    return functools.reduce(combine, values)


def merge(store: Store, names: Sequence[str], combine: Callable[[Any, Any], Any], *,
          fan_in: int | None = None) -> Any:
    """Fold the partials of `names` with `combine(a, b)`, always in sorted name order (so the
    result never depends on which worker finished first). `fan_in`: merge in a tree of Ray tasks
    (leaves read `fan_in` partials each) instead of on the driver, for large partial states."""
    names = sorted(names)
    if not names:
        raise ValueError("nothing to merge")
    if not fan_in:
        return _fold(store, names, combine)
    import ray

    leaf = ray.remote(_fold).options(num_cpus=1)
    node = ray.remote(_combine).options(num_cpus=1)
    level = [leaf.remote(store, names[i:i + fan_in], combine)
             for i in range(0, len(names), fan_in)]
    while len(level) > 1:
        level = [node.remote(combine, *level[i:i + fan_in]) for i in range(0, len(level), fan_in)]
    return ray.get(level[0])
