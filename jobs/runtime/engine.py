"""The one shard engine: units of work, a partial then its marker, resume, bounded retries, merge.

    device = resolve_device(cfg.device)                  # after init_ray(); BadInput if no GPU
    plan = device.plan(cfg.workers or None, cpus_per_worker=8)
    fp = fingerprint(cfg.to_dict(), weights_digest, device=device)   # everything behind the numbers
    store = Store(cfg.out, fp)                           # <out>/_partials/<fp>/<unit>.pkl + .done
    units = [Unit("conv3-00000-00063", (layer, chans), size=64), ...]
    units = range_units("shard-", shard_ranges(n, shards=64))   # shard-000000000-000002000 ...
    run = run_units(units, Task(fn, model), store, plan=plan, progress=bar)   # simple jobs
    run = run_units(units, Pool(ShardWorker, blob), store, plan=plan)        # model held by actors
    table = merge(store, run.names, combine)             # in unit order: completion order never matters

A unit is a named piece of work (a shard of images, a chunk of channels, an ablation plan). Its
worker computes a value and the engine pickles it to `<name>.pkl`, THEN writes `<name>.done`
(JSON: the unit's small info, e.g. images read and skipped, so counts need no partial read). A
rerun with the same fingerprint skips every unit that has its marker (`run.resumed`); a partial
without a marker is never trusted. The fingerprint hashes the job's configuration together with
the code version, the device kind and name, the torch/cuDNN versions and the float precision
settings, so a change to any of them starts afresh in a new folder.

`Task(fn, *shared)`: one Ray task per unit, `fn(*shared, *unit.args)`; shared arguments (a model)
are `ray.put` once. `Pool(cls, *init_args)`: long-lived actors, `cls(*init_args)` once per actor
(load the model there), then `obj.run(*unit.args)` per unit. A worker returns a value, or
`Result(value, info)` to record `info` in the marker.

Failures: a unit whose worker process, actor or node died is re-queued (on another actor) and
tried at most `attempts` times; an exception raised by the unit's own code stops the job with its
traceback (a bug or bad data: retrying would only repeat it), unless it is one of `retry_on`. An
actor whose constructor fails (no device, out of memory, a bad driver) is replaced at most
`start_attempts` times in all; then the job stops with one line (JobFailed, exit 1).

Tests inject faults with `set_test_hook(fn)`: `fn(unit)` runs in the worker before each unit
(sleep, or kill the process). Production code never sets it; no job option or environment variable
injects faults. Ray lives only here and in jobs/; the workers' code comes from pipeline/.
"""
from __future__ import annotations

import functools
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from jobs.runtime.console import Progress, log
from jobs.runtime.device import Device, Plan, code_version, digest, fingerprint, resolve_device
from jobs.runtime.options import JobFailed

__all__ = ["Unit", "range_units", "Result", "Task", "Pool", "Store", "RunStats", "Device", "Plan",
           "resolve_device", "fingerprint", "digest", "code_version", "run_units", "merge",
           "set_test_hook", "current_test_hook"]

_TEST_HOOK: Callable[["Unit"], None] | None = None


def set_test_hook(fn: Callable[["Unit"], None] | None) -> None:
    """Tests only: `fn(unit)` runs in the worker before each unit (fault injection)."""
    global _TEST_HOOK
    _TEST_HOOK = fn


def current_test_hook() -> Callable[["Unit"], None] | None:
    """The hook `set_test_hook` installed (None in production), for loops outside `run_units`
    (the Ray Train loop) that call it themselves."""
    return _TEST_HOOK


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
    value: Any                               # goes to the partial (<name>.pkl)
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
    computes them strictly in submission order; a worker with a `feed(*args)` method hears of
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

    def done(self, name: str) -> bool:
        from pipeline.results.tables import exists

        return exists(self._file(name, "done"))

    def info(self, name: str) -> dict:
        from pipeline.results.tables import read_json

        return read_json(self._file(name, "done"))

    def save(self, name: str, value: Any, info: dict) -> None:
        from pipeline.results.tables import write_bytes, write_json

        write_bytes(self._file(name, "pkl"), pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
        write_json(self._file(name, "done"), info)        # the marker comes last

    def load(self, name: str) -> Any:
        from pipeline.results.tables import read_bytes

        return pickle.loads(read_bytes(self._file(name, "pkl")))

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
def _execute(call: Callable, unit: Unit, store: Store, hook: Callable | None) -> dict:
    t = time.perf_counter()
    if hook is not None:
        hook(unit)
    out = call(*unit.args)
    value, info = (out.value, out.info) if isinstance(out, Result) else (out, {})
    info = {"unit": unit.name, "seconds": round(time.perf_counter() - t, 3), **info}
    store.save(unit.name, value, info)
    return info


def _task(fn: Callable, unit: Unit, store: Store, hook: Callable | None, *shared: Any) -> dict:
    return _execute(functools.partial(fn, *shared), unit, store, hook)


class _Host:
    """The actor around a Pool's class: builds it once, runs units, persists their partials.

    With several units in flight (a threaded actor) Ray may start the calls in any order: the
    driver numbers them per actor (`seq`), and each call first waits for its turn to be fed
    (`obj.feed`, in order), then for its turn to compute. Feeding never waits for a computation,
    so the unit after the running one is fed at once (no deadlock between the two turns)."""

    def __init__(self, cls: type, init_args: tuple, store: Store, hook: Callable | None):
        import threading

        self.obj, self.store, self.hook = cls(*init_args), store, hook
        self.turn = threading.Condition()
        self.fed = self.ran = 0

    def ready(self) -> bool:
        return True

    def run(self, unit: Unit, seq: int | None = None) -> dict:
        if seq is None:
            return _execute(self.obj.run, unit, self.store, self.hook)
        with self.turn:
            self.turn.wait_for(lambda: self.fed == seq)
            try:
                if hasattr(self.obj, "feed"):
                    self.obj.feed(*unit.args)
            finally:
                self.fed += 1
                self.turn.notify_all()
            self.turn.wait_for(lambda: self.ran == seq)
        try:
            return _execute(self.obj.run, unit, self.store, self.hook)
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


class _Driver:
    """The loop behind run_units: hands units to workers, counts, retries, replaces actors."""

    def __init__(self, work: Task | Pool, store: Store, plan: Plan, attempts: int,
                 start_attempts: int, retry_on: tuple, stats: RunStats,
                 progress: Progress | None, on_done: Callable | None) -> None:
        import ray

        self.ray, self.store, self.plan, self.stats = ray, store, plan, stats
        self.attempts, self.start_attempts, self.retry_on = attempts, start_attempts, retry_on
        self.progress, self.on_done = progress, on_done
        self.hook, self.tries, self.start_failures = _TEST_HOOK, {}, 0
        self.running: dict[Any, tuple[Any, Unit]] = {}
        self.starting: dict[Any, Any] = {}
        self.free: dict[Any, int] = {}           # started actor -> units it may still take
        self.seq: dict[Any, int] = {}            # actor -> units handed to it so far
        self.killed: set[Any] = set()            # actors this driver killed (no retry counted)
        self.actors: list[Any] = []
        self.inflight = 1 if isinstance(work, Task) else work.inflight
        opts = {"max_retries": 0} if isinstance(work, Task) else {"max_restarts": 0,
                                                                  "max_task_retries": 0}
        if self.inflight > 1:
            opts["max_concurrency"] = self.inflight
        if isinstance(work, Task):
            self.task = ray.remote(_task).options(**opts, **plan.resources)
            self.fn, self.shared = work.fn, tuple(ray.put(s) for s in work.shared)
        else:
            self.host = ray.remote(_Host).options(**opts, **plan.resources)
            self.pool = work
            self.init_ref = ray.put(work.init_args)

    def spawn(self) -> None:
        a = self.host.remote(self.pool.cls, self.init_ref, self.store, self.hook)
        self.actors.append(a)
        self.starting[a.ready.remote()] = a

    def submit(self, pending: deque) -> None:
        if hasattr(self, "task"):
            while pending and len(self.running) < self.plan.workers:
                u = pending.popleft()
                ref = self.task.remote(self.fn, u, self.store, self.hook, *self.shared)
                self.running[ref] = (None, u)
        while pending and (a := self.slot(len(pending))) is not None:
            u = pending.popleft()
            self.free[a] -= 1
            if self.inflight > 1:
                self.seq[a] = self.seq.get(a, 0) + 1
                self.running[a.run.remote(u, self.seq[a] - 1)] = (a, u)
            else:
                self.running[a.run.remote(u)] = (a, u)

    def slot(self, pending: int) -> Any:
        """The actor with the most free room; a busy actor takes one more unit only when every
        actor still starting will find one left (a small job spreads over all actors)."""
        a = max(self.free, key=self.free.get, default=None)
        if a is None or self.free[a] == 0:
            return None
        if self.free[a] < self.inflight and pending <= len(self.starting):
            return None
        return a

    def started(self, ref: Any) -> None:
        a = self.starting.pop(ref)
        try:
            self.ray.get(ref)
            self.free[a] = self.inflight
        except self.ray.exceptions.RayError as e:
            self.start_failures += 1
            self.kill(a)
            line = _last_error_line(e)
            if self.start_failures >= self.start_attempts:
                raise JobFailed(f"no worker could start ({self.start_failures} tries); last "
                                f"error: {line}") from None
            log(f"a worker failed to start ({line}); starting another")
            self.spawn()

    def finished(self, ref: Any, pending: deque) -> None:
        a, u = self.running.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if not isinstance(getattr(e, "cause", None), self.retry_on):
                raise
            self.retry(u, e, pending, a)
            return
        except self.ray.exceptions.RayError as e:     # worker, actor or node died
            if a in self.killed:      # lost with an actor this driver replaced: not its fault
                pending.appendleft(u)
                return
            self.retry(u, e, pending, a)
            return
        if a is not None:
            self.free[a] += 1
        self.stats.computed += 1
        self.stats.infos[u.name] = info
        if self.progress is not None:
            self.progress.update(u.size)
        if self.on_done is not None:
            self.on_done(u, info)

    def retry(self, u: Unit, e: BaseException, pending: deque, actor: Any) -> None:
        self.tries[u.name] = self.tries.get(u.name, 0) + 1
        self.stats.retries += 1
        if self.tries[u.name] >= self.attempts:
            raise JobFailed(f"unit {u.name} failed {self.attempts} times; last error: "
                            f"{_last_error_line(e)}") from None
        log(f"{u.name} lost ({type(e).__name__}: worker or node died); retrying on another "
            f"worker")
        pending.appendleft(u)
        if actor is not None:             # a task is simply resubmitted by submit()
            self.kill(actor)
            self.spawn()

    def kill(self, actor: Any) -> None:
        self.free.pop(actor, None)
        self.killed.add(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass

    def loop(self, todo: list[Unit]) -> None:
        pending = deque(todo)
        if hasattr(self, "pool"):
            for _ in range(min(self.plan.workers, len(todo))):
                self.spawn()
        try:
            while pending or self.running:
                self.submit(pending)
                refs = list(self.running) + list(self.starting)
                done, _ = self.ray.wait(refs, num_returns=1, timeout=30.0)
                if not done and not self.running:
                    log(f"waiting for {len(self.starting)} worker(s) to be placed: does the "
                        f"cluster have the CPUs/GPUs they ask for ({self.plan.resources})?")
                for ref in done:
                    if ref in self.starting:
                        self.started(ref)
                    else:
                        self.finished(ref, pending)
        finally:
            for a in self.actors:
                self.kill(a)


def run_units(units: Sequence[Unit], work: Task | Pool, store: Store, *, plan: Plan,
              resume: bool = True, attempts: int = 3, start_attempts: int = 3,
              retry_on: tuple[type[BaseException], ...] = (), progress: Progress | None = None,
              on_done: Callable[[Unit, dict], None] | None = None) -> RunStats:
    """Compute every unit without a marker (module docstring); returns counts and marker infos."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be unique")
    stats = RunStats(names)
    todo = []
    for u in units:
        if resume and store.done(u.name):
            stats.infos[u.name] = store.info(u.name)
            stats.resumed += 1
            if progress is not None:
                progress.done += u.size
                progress.start_done += u.size
        else:
            todo.append(u)
    if todo:
        _Driver(work, store, plan, attempts, start_attempts, retry_on, stats, progress,
                on_done).loop(todo)
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
