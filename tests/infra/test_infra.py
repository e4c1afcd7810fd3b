"""infra/: every manifest parses and says what docs/cluster.md promises; the jobs they start exist
and accept the flags they are given; and a real `ray job submit` to a real local cluster runs an
analysis to SUCCEEDED and leaves its Parquet behind.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import free_ports
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
RAYJOBS = sorted(INFRA.glob("rayjob-*.yaml"))
DOCS = [p for p in (ROOT / "docs" / "cluster.md", ROOT / "README.md") if p.is_file()]
# The `ray` command of this Python (its console script, else the module behind it).
# This Python's environment, never whatever `ray`/`python` happen to be first on PATH: the suite
# must pass from an unactivated virtual environment too.
BIN = os.path.dirname(sys.executable)
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one YAML document expected"
    return docs[0]


def test_cluster_launcher_yaml_is_valid_for_ray_and_has_a_gpu_worker_and_a_cpu_free_head():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(INFRA / "cluster.yaml")
    cfg = prepare_config(raw)          # Ray's own defaults merge + JSON-schema validation
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    gpu_types = [t for n, t in types.items() if n != cfg["head_node_type"]
                 and t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert all(re.match(r"[gp]\d", t["node_config"]["InstanceType"]) for t in gpu_types)
    assert cfg["docker"]["image"]
    for t in types.values():       # S3 through an instance role, never keys
        assert "IamInstanceProfile" in t["node_config"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_manifest(path: Path):
    job = _load(path)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("python -m jobs.")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == md.version("ray")
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        shm = [v["name"] for v in pod["volumes"]
               if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if m["mountPath"] == "/dev/shm"]
        assert mounts and all(m["name"] in shm for m in mounts), path.name
        assert pod.get("serviceAccountName"), "S3 access comes from the service account's role"


def test_dockerfile_pins_the_ray_image_of_pyproject():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", base)
    assert m, f"base image {base} is not a pinned rayproject/ray:X.Y.Z-pyNN-cuNNN tag"
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    assert m.group(1) == pin == md.version("ray")
    assert f"{m.group(2)}.{m.group(3)}" == f"{sys.version_info.major}.{sys.version_info.minor}"
    # What the image copies must exist in the repository.
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part


def test_runtime_env_is_accepted_by_ray_and_carries_no_credentials():
    from ray.runtime_env import RuntimeEnv

    env = _load(INFRA / "runtime_env.yaml")
    RuntimeEnv(**env)                  # raises on unknown or malformed fields
    assert "working_dir" not in env    # given by --working-dir on the command line
    for path in [*INFRA.iterdir(), *DOCS]:
        text = path.read_text()
        assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[:=]\s*\S",
                             text), path.name
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path.name


def test_working_dir_upload_is_small_and_holds_the_code(tmp_path: Path):
    """What `ray job submit --working-dir . --runtime-env infra/runtime_env.yaml` uploads, for a
    copy of the repository with a run's results, a checkpoint and a .git folder lying around."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "jobs", "infra", "tests", "docs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".rayignore", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    for junk in ("results/analysis/resnet34/stimuli/topk.parquet", ".git/objects/ab/cdef",
                 "model.pt", "jobs/__pycache__/x.cpython-311.pyc", ".ci/test.sh"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_bytes(b"x" * 1000)
    zip_path = tmp_path / "pkg.zip"
    create_package(str(repo), zip_path, include_gitignore=True,
                   excludes=_load(INFRA / "runtime_env.yaml")["excludes"])
    names = zipfile.ZipFile(zip_path).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"pipeline", "jobs", "pyproject.toml"} <= tops
    assert "pipeline/models/zoo.py" in names and "jobs/reproduce.py" in names
    assert not tops & {".git", "results", "tests", "docs", ".ci"}, tops
    assert not [n for n in names if n.endswith((".pt", ".parquet", ".pyc"))]
    assert zip_path.stat().st_size < 2 * 2**20


def _commands(text: str) -> list[list[str]]:
    """Every `python -m jobs.X …` command in a text (shell continuations and YAML folding)."""
    text = re.sub(r"\\\n[ \t]*#?[ \t]*", " ", text)   # continuations, also inside comments
    out = []
    for m in re.finditer(r"python3? -m (jobs\.[a-z_]+)((?:[ \t]+(?!#)[^\s`'\"|;&)]+)*)", text):
        args = shlex.split(m.group(2))
        out.append([m.group(1), *args])
    return out


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [*INFRA.iterdir(), *DOCS]:
        text = path.read_text()
        if path.suffix == ".yaml":   # the comments' examples, and the entrypoint as YAML reads it
            text = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
            text += "\n" + _load(path).get("spec", {}).get("entrypoint", "")
        found += [(path.name, c) for c in _commands(text)]
    return found


def test_every_job_the_infra_and_docs_start_exists_and_accepts_its_flags():
    commands = _all_commands()
    names = {c[0] for _, c in commands}
    assert {"jobs.reproduce", "jobs.analyze", "jobs.train"} <= names, names
    for where, (module, *args) in commands:
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{module} (named in {where}) has no main"
        from jobs.runtime.options import Options, build_parser

        config = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Options)
                  and v.__module__ == mod.__name__]
        assert len(config) == 1, f"{module} declares {len(config)} option dataclasses"
        try:
            build_parser(config[0], mod.PROG, mod.__doc__).parse_args(args)
        except SystemExit as e:
            if e.code == 0:            # --help
                continue
            pytest.fail(f"{where}: `python -m {module} {' '.join(args)}` is rejected ({e})")


def test_docs_give_the_exact_submit_command_and_name_only_existing_files():
    cluster_md = (ROOT / "docs" / "cluster.md").read_text()
    submit = ("ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- "
              "python -m jobs.reproduce --preset paper")
    assert submit in re.sub(r"\s*\\\n\s*", " ", cluster_md)
    for path in DOCS:
        for ref in re.findall(r"(?<![\w/.])infra/[\w.\-/*]+", path.read_text()):
            ref = ref.rstrip(".")
            assert list(ROOT.glob(ref)), f"{path.name} names {ref}, which is missing"
    for f in INFRA.iterdir():          # and every infra file is documented
        assert f"infra/{f.name}" in cluster_md, f"docs/cluster.md does not mention infra/{f.name}"


# --- a real cluster ------------------------------------------------------------------------------

def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real single-node Ray cluster of its own (ports, temp dir, no auth token on loopback).

    Started with `--block` in its own session so that the test stops exactly this cluster by
    signalling its process group (never `ray stop`, which would hit colleagues' clusters).
    """
    gcs, dash, agent_listen, client, agent_grpc, metrics, runtime_env_agent = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rayR", dir="/tmp")   # short: unix socket paths
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")
    proc = subprocess.Popen(
        [*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_listen}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
         f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{address}/api/version", proc)
        yield address, env
    finally:
        # SIGTERM lets `ray start --block` stop its node; whatever of that session outlives a
        # short grace period (raylet, GCS, workers) is killed, and its temp dir removed.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        _kill_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_session(sid: int) -> None:
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if os.getsid(int(pid_dir.name)) == sid:
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def test_ray_job_submit_runs_an_analysis_on_a_real_cluster(ray_head, tmp_path: Path,
                                                           monkeypatch):
    import pyarrow.parquet as pq

    address, env = ray_head
    out = tmp_path / "analysis"
    runtime_env = _load(INFRA / "runtime_env.yaml")
    # The runtime env of the docs plus this machine's needs: 2 shared cores, no auth token.
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "OMP_NUM_THREADS": "1",
                               "RAY_AUTH_MODE": "disabled"}
    cmd = [*RAY, "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--submission-id",
           f"report-test-{os.getpid()}", "--",
           "python", "-m", "jobs.analyze", "--limit", "16", "--layers", "pool1,conv3",
           "--workers", "1", "--shards", "1", "--batch-size", "16", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    log = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, log          # `ray job submit` exits 0 only for SUCCEEDED

    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # this test's cluster has no token
    client = JobSubmissionClient(address)
    assert client.get_job_status(f"report-test-{os.getpid()}") == JobStatus.SUCCEEDED
    topk = pq.read_table(out / "stimuli" / "topk.parquet")
    assert set(topk.column("layer").to_pylist()) == {"pool1", "conv3"}
    assert topk.num_rows > 0 and max(topk.column("image_index").to_pylist()) < 16
    rf = pq.read_table(out / "receptive_fields.parquet").to_pylist()
    assert {r["layer"]: r["rf_size"] for r in rf}["conv3"] == 27
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert (counts["images"], counts["shards"]) == (16, 1)
