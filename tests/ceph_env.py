"""The test Ceph cluster made by scripts/ceph-test-cluster, for tests that need RADOS, RBD or S3.

A plain module, not a conftest: tests import it (`import ceph_env`) and call ceph_env.cluster(), which
returns DIR/env.json of the cluster named by $BACKYFS_CEPH_DIR, or skips the test when there is none.
With $CI set it fails instead, so a CI job cannot pass by silently skipping every Ceph test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

NO_CLUSTER = "no test Ceph cluster: run scripts/ceph-test-cluster up DIR and set BACKYFS_CEPH_DIR"


def cluster() -> dict[str, str]:
    """The cluster's settings: CEPH_CONF, BACKYFS_TEST_RADOS_POOL, BACKYFS_TEST_S3_ENDPOINT..."""
    directory = os.environ.get("BACKYFS_CEPH_DIR")
    if not directory:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_CLUSTER} (CI is set: Ceph tests must run, not skip)", pytrace=False)
        pytest.skip(NO_CLUSTER)
    return dict(_load(directory))


@functools.cache
def _load(directory: str) -> dict[str, str]:
    path = os.path.join(directory, "env.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        pytest.fail(f"BACKYFS_CEPH_DIR={directory}, but {path} is unusable ({exc}): is the cluster up?")


def s3_options(env: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments for S3Store (and, renamed, boto3) that reach the cluster's radosgw."""
    return {
        "endpoint_url": env["BACKYFS_TEST_S3_ENDPOINT"],
        "access_key": env["BACKYFS_TEST_S3_ACCESS_KEY"],
        "secret_key": env["BACKYFS_TEST_S3_SECRET_KEY"],
        "region": "us-east-1",
        "path_style": True,
    }


def s3_client(env: dict[str, str]) -> Any:
    """A boto3 client of our own, to reach objects behind a store's back. Shared: making one takes
    a few tenths of a second."""
    return _s3_client(
        env["BACKYFS_TEST_S3_ENDPOINT"], env["BACKYFS_TEST_S3_ACCESS_KEY"], env["BACKYFS_TEST_S3_SECRET_KEY"]
    )


@functools.cache
def _s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def import_module(name: str) -> Any:
    """Import rados or rbd: a skip on a developer's machine without them, a failure in CI."""
    if os.environ.get("CI"):
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name)


@contextlib.contextmanager
def rados_ioctx(env: dict[str, str], pool: str) -> Iterator[Any]:
    """A librados io context of our own on pool."""
    rados = import_module("rados")
    handle = rados.Rados(conffile=env["CEPH_CONF"])
    handle.connect(timeout=10)
    try:
        ioctx = handle.open_ioctx(pool)
        try:
            yield ioctx
        finally:
            ioctx.close()
    finally:
        handle.shutdown()


def rgw(env: dict[str, str], action: str) -> None:
    """Stop ("rgw-stop") or start ("rgw-start") the cluster's radosgw."""
    script, directory = env["BACKYFS_TEST_CEPH_SCRIPT"], env["BACKYFS_CEPH_DIR"]
    subprocess.run([script, action, directory], check=True, timeout=120)


def drop_s3_bucket(env: dict[str, str], bucket: str) -> None:
    """Delete a bucket and everything in it; a bucket that is already gone is fine."""
    client = s3_client(env)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass
