"""A quiet console: one line per stage, a progress line with rate and ETA, Ray's noise in a file.

    con = Console("actmax")
    with con.stage("optimize"):                 # "actmax: optimize ..." / "... done in 3.2 s"
        bar = con.progress(total=128, unit="channels")
        bar.update(64)                          # "actmax: 64/128 channels, 21.3 channels/s, ETA 0:03"
    con.seconds                                 # {"optimize": 3.2}: the run report's stages
    con.warn("no --checkpoint: ...")            # warnings stay visible, prefixed WARNING
    con.result(table_text)                      # a job's big printout (Table 1): stdout

Everything but `result` goes to stderr (stdout stays for a job's result, e.g. a path or a table).
A progress line is printed at most every `every` seconds and once at the end, so a log file stays
readable (tqdm's `{rate_fmt} {remaining}` without carriage returns). `init_ray` starts or joins
Ray with its own chatter routed to `<out>/_logs/ray.log` (local --out) and the workers' output
left in Ray's session logs (`log_to_driver=False`, Ray's public switch); Ray's errors and the
job's warnings stay on the console. A local Ray it starts listens on loopback only.

A chain (jobs.reproduce) runs each sub-job inside `with con.nest("ablate:resnet34"):`. A Console
made inside that block is nested: it keeps its warnings, its `tick` lines (train's epochs) and the
progress lines of stages long enough to print one before they end, all prefixed by the chain's
stage (`reproduce: ablate:resnet34: evaluate 64/128 images, ...`); its `info` and stage lines and
its `result` are dropped, so the chain's console holds one start and one end line per stage.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterator

__all__ = ["log", "Console", "Progress", "init_ray", "no_cluster", "format_seconds", "relay", "LOOPBACK"]

_NESTING: list[str] = []     # the chain stages now running (Console.nest), innermost last


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """Counts work done against a total; prints `done/total unit, rate, ETA` now and then."""

    def __init__(self, prefix: str, total: int, unit: str, done: int = 0,
                 every: float = 10.0, final: bool = True) -> None:
        self.prefix, self.total, self.unit, self.every = prefix, total, unit, every
        self.done = self.start_done = done          # resumed work does not count in the rate
        self.t0 = self.last = time.perf_counter()
        self.final = final      # False: the closing line only after a periodic one (a long stage)
        self.printed = 0

    @property
    def rate(self) -> float:
        return (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        rate, left = self.rate, self.total - self.done
        eta = format_seconds(left / rate) if rate > 0 and left > 0 else "0:00"
        return (f"{self.prefix}{self.done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, "
                f"ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if (self.done >= self.total and (self.final or self.printed)
                or now - self.last >= self.every):
            self.last, self.printed = now, self.printed + 1
            log(self.line())


class Console:
    """Stage lines and stage timings of one job (`seconds` feeds the run report); nested when
    made inside a chain's `nest` block (module docstring)."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.outer = _NESTING[-1] if _NESTING else None   # "reproduce: ablate:resnet34" nested
        self.seconds: dict[str, float] = {}
        self.warnings: list[str] = []
        self.current: str | None = None                   # the stage now running
        self.t0 = time.perf_counter()

    @property
    def nested(self) -> bool:
        return self.outer is not None

    def info(self, msg: str) -> None:
        """Setup and stage chatter: dropped when nested."""
        if not self.nested:
            log(f"{self.job}: {msg}")

    def tick(self, msg: str) -> None:
        """A line of a long stage's progress (an epoch's metrics): shown nested too."""
        log(f"{self.outer or self.job}: {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log(f"{self.outer or self.job}: WARNING: {msg}")

    def result(self, text: str) -> None:
        """A job's big printout (Table 1, a summary) on stdout; the chain shows none."""
        if not self.nested:
            print(text, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, quiet: bool = False, label: str | None = None) -> Iterator[None]:
        """Times the block as `name` (run.json's seconds); its lines say `label` (default name)."""
        label = label or name
        if not quiet:
            self.info(f"{label} ...")
        t, before, self.current = time.perf_counter(), self.current, name
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.current = before
        if not quiet:
            self.info(f"{label} done in {dt:.1f} s")

    @contextlib.contextmanager
    def nest(self, name: str) -> Iterator[None]:
        """Consoles made inside the block are the chain stage `name`'s sub-job (nested)."""
        _NESTING.append(f"{self.job}: {name}")
        try:
            yield
        finally:
            _NESTING.pop()

    def progress(self, total: int, unit: str, done: int = 0, every: float = 10.0) -> Progress:
        if not self.nested:
            return Progress(f"{self.job}: ", total, unit, done, every)
        return Progress(f"{self.outer}: {self.current + ' ' if self.current else ''}", total,
                        unit, done, every, final=False)

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.t0


@contextlib.contextmanager
def relay(con: Console):
    """A `ray.util.queue.Queue` that remote code puts lines into (`queue.put_nowait(text)`);
    a driver thread prints them through `con.tick` while the block runs, so a job's progress
    lines reach the console even when Ray does not forward worker output (jobs.train's epochs)."""
    from ray.util.queue import Empty, Queue

    queue, stop = Queue(actor_options={"num_cpus": 0}), threading.Event()

    def pump() -> None:
        while True:
            try:
                con.tick(queue.get(timeout=0.5))
            except Empty:
                if stop.is_set():
                    return

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=30)
        queue.shutdown()


class _LazyFile(logging.FileHandler):
    """A log file (and its folder) created only when the first record arrives."""

    def __init__(self, path: str) -> None:
        super().__init__(path, delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def _log_file(out: str | None) -> str | None:
    """<out>/_logs/ray.log for a local --out, else None (no file to append to on s3://)."""
    if not out or "://" in out and not out.startswith("file://"):
        return None
    return os.path.join(out.removeprefix("file://"), "_logs", "ray.log")


def _quiet_ray_logger(path: str | None) -> None:
    """Ray's driver log: everything to `path` (when given), only errors to the console."""
    import ray  # noqa: F401 - importing ray installs its logger's handlers, adjusted below

    logger = logging.getLogger("ray")
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.ERROR)
    if path and not any(getattr(h, "baseFilename", None) == os.path.abspath(path)
                        for h in logger.handlers):
        handler = _LazyFile(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


LOOPBACK = "127.0.0.1"


def _loopback_env() -> None:
    """Make a local Ray node take 127.0.0.1 as its address, so that it listens on loopback only.
    On Linux Ray replaces 127.0.0.1 in `_node_ip_address` by the machine's routable address
    unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0 (its single-node mode, the default on macOS
    and Windows), a variable Ray reads when it is imported: set before the first `import ray`."""
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        log("ray was imported before init_ray: the local Ray listens on this machine's address, "
            "not on loopback only")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def no_cluster() -> bool:
    """Whether this job has no Ray cluster to use: RAY_ADDRESS unset (not under `ray job
    submit`) and no Ray started in this process (tests, jobs.reproduce). Such a job may run
    its units in this process (`engine.run_units(..., here=True)`) when one worker would do
    all of them anyway: starting Ray and a worker process would only add their seconds."""
    if os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized()


def init_ray(out: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             **kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one
    that listens on 127.0.0.1 only.

    `address="local"` avoids joining a stale cluster recorded in /tmp/ray by an earlier
    `ray start`; an already initialised Ray (tests, jobs.reproduce) is reused as it is. With
    `quiet`, Ray's INFO and WARNING lines and the workers' stdout/stderr stay off the console:
    the driver's Ray log goes to `<out>/_logs/ray.log` (a local --out), the workers' output
    stays in Ray's session logs (/tmp/ray/session_latest/logs). Ray's errors still show, and
    the job's own warnings (Console.warn) are never routed away.
    A failing unit's error reaches the driver as an exception either way.
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        _loopback_env()
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs.setdefault("log_to_driver", not quiet)
    if quiet:
        _quiet_ray_logger(_log_file(out))
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, **kwargs)
