"""Shared test fixtures: a real S3-compatible server (moto) on loopback; Ray on loopback too.

    def test_x(s3_bucket):                     # a fresh, empty bucket on the session's server
        url = f"s3://{s3_bucket}/data"          # s3fs/boto3 find the server through AWS_* env vars

`demo_root` is the embedded demo data set (pipeline.data.demo), generated at most once per session in a
session temporary folder: PREFERRED_STIMULI_DATA points there for the whole session, so tests
(and jobs they run in-process) never write into ~/.cache.

`s3_server` starts one moto ThreadedMotoServer on 127.0.0.1 (a free port) per test session and
points the standard AWS environment variables at it, so code under test configures nothing.
"""
from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

# Ray nodes on 127.0.0.1 only: Ray reads this when it is imported (before any test module is),
# and only with it does a node keep `_node_ip_address="127.0.0.1"` (jobs.runtime.console).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",   # never probe 169.254.169.254 for credentials
}


@pytest.fixture(scope="session", autouse=True)
def _demo_cache(tmp_path_factory) -> Iterator[str]:
    """Point ensure_demo_data's default cache at a session temporary folder."""
    path = str(tmp_path_factory.mktemp("demo-cache"))
    saved = os.environ.get("PREFERRED_STIMULI_DATA")
    os.environ["PREFERRED_STIMULI_DATA"] = path
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("PREFERRED_STIMULI_DATA", None)
        else:
            os.environ["PREFERRED_STIMULI_DATA"] = saved


@pytest.fixture(scope="session")
def demo_root(_demo_cache: str) -> str:
    """Root (local folder with train/ and val/) of the default demo data, seed 0."""
    from pipeline.data.demo import ensure_demo_data

    return ensure_demo_data()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (http://127.0.0.1:PORT) of a moto S3 server; AWS_* env vars point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    _clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_s3fs_cache()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """Name of a fresh, empty bucket on the session's S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances with the settings of their time: start afresh.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
