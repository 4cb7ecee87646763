"""Backups into the Ceph stores of the test cluster (scripts/ceph-test-cluster): S3 through radosgw, and
RADOS, configured the way a user does it ([store] in the TOML config) and driven through the CLI.

Each test uses a bucket (S3) or object prefix (RADOS) of its own and removes it at the end. The radosgw
outage test stops the cluster's radosgw for a few seconds and always starts it again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ceph_env
import pytest
from conftest import RepoEnv, files_equal, overwrite_blocks, write_image
from test_rbd import OBJ, RbdPool, assert_same, rbd_pool  # noqa: F401  (rbd_pool is a fixture)

pytestmark = pytest.mark.ceph

MiB = 1 << 20
FAILURE_BOUND_S = 60  # a dead endpoint must fail a backup within this, not after minutes of retries


@pytest.fixture
def s3_bucket() -> Iterator[tuple[dict[str, str], str]]:
    """(cluster env, name of a bucket no one else uses); the bucket and its objects go at the end.
    backyfs creates the bucket itself (create_bucket = true)."""
    env = ceph_env.cluster()
    bucket = f"backyfs-test-{uuid.uuid4().hex[:12]}"
    yield env, bucket
    ceph_env.drop_s3_bucket(env, bucket)


def s3_config(env: dict[str, str], bucket: str) -> str:
    opts = ceph_env.s3_options(env)
    return (f'[store]\ntype = "s3"\nbucket = "{bucket}"\nendpoint_url = "{opts["endpoint_url"]}"\n'
            f'region = "{opts["region"]}"\naccess_key = "{opts["access_key"]}"\n'
            f'secret_key = "{opts["secret_key"]}"\npath_style = true\ncreate_bucket = true\n')


def bucket_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    client = ceph_env.s3_client(env)
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", ())]
    except client.exceptions.NoSuchBucket:  # backyfs has not made it yet
        return []
    return keys


def test_s3_store_backup_restore_and_rebuild(repo_env: RepoEnv, tmp_path: Path,
                                             s3_bucket: tuple[dict[str, str], str]) -> None:
    env, bucket = s3_bucket
    repo_env.use_config(s3_config(env, bucket))
    kinds = ["rand", "hole", "text", "dup", "zero", "rand", "dup", "half", "hole", "rand"]
    img = write_image(tmp_path / "disk.img", kinds, tail=12345)
    v1_copy = tmp_path / "v1.img"
    shutil.copyfile(img, v1_copy)

    first = repo_env.backup(img, "vm")
    overwrite_blocks(img, [0, 3])
    second = repo_env.backup(img, "vm")
    assert second["parent"] == first["uid"]
    assert second["bytes_new"] == 2 * OBJ
    # Everything lives in the bucket; nothing in a local store directory.
    assert not repo_env.store_dir.exists()
    keys = bucket_keys(env, bucket)
    blocks = [k for k in keys if k.startswith("blocks/")]
    assert len(blocks) == repo_env.stats()["objects"] > 0
    assert {f"versions/{v['uid']}/meta.json" for v in (first, second)} <= set(keys)

    for uid, expected in ((first["uid"], v1_copy), (second["uid"], img)):
        out = tmp_path / f"restored-{uid}.img"
        repo_env.ok("restore", uid, out)
        assert files_equal(out, expected)
    assert repo_env.ok("deep-scrub", "--all").rc == 0

    # The bucket alone is enough: a lost metadata database is rebuilt from it.
    repo_env.db_path.unlink()
    repo_env.ok("rebuild-db")
    assert {v["uid"] for v in repo_env.versions()} == {first["uid"], second["uid"]}
    out = tmp_path / "after-rebuild.img"
    repo_env.ok("restore", "vm", out)
    assert files_equal(out, img)


def test_wrong_s3_credentials_name_what_to_check(repo_env: RepoEnv, tmp_path: Path,
                                                s3_bucket: tuple[dict[str, str], str]) -> None:
    """A wrong secret or access key: one line that says which to check and never shows the secret;
    the version stays pending, and the right credentials then resume it."""
    env, bucket = s3_bucket
    good = s3_config(env, bucket)
    img = write_image(tmp_path / "img", ["rand", "text"])
    secret = ceph_env.s3_options(env)["secret_key"]
    for old, new, hint in ((f'secret_key = "{secret}"', 'secret_key = "not-the-secret"', "check secret_key"),
                           ('access_key = "', 'access_key = "X', "check access_key")):
        repo_env.use_config(good.replace(old, new))
        res = repo_env.run("backup", img, "vm")
        assert res.rc == 1 and len(res.err_lines) == 1 and hint in res.err, res.err
        assert "not-the-secret" not in res.err and secret not in res.err
    repo_env.use_config(good)
    stats = repo_env.backup(img, "vm")
    assert [v["state"] for v in repo_env.versions()] == ["valid"] and stats["bytes_read"] > 0


def test_rados_store_with_an_rbd_image(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:  # noqa: F811
    env = ceph_env.cluster()
    rbd, pool, prefix = rbd_pool, env["BACKYFS_TEST_RADOS_POOL"], f"test-{uuid.uuid4().hex[:12]}"
    repo_env.use_config(f'[store]\ntype = "rados"\npool = "{pool}"\nconffile = "{env["CEPH_CONF"]}"\n'
                        f'prefix = "{prefix}"\n')
    try:
        image = rbd.create("to-rados", 64 * MiB)
        rbd.write(image, 0, uuid.uuid4().bytes * (3 * OBJ // 16))
        rbd.write(image, 9 * OBJ, b"x" * 5000)
        first = repo_env.backup(rbd.spec(image), "rbdvm")  # type: ignore[arg-type]
        assert first["bytes_read"] == 4 * OBJ
        rbd.write(image, 10 * OBJ + 3, b"new object")
        second = repo_env.backup(rbd.spec(image), "rbdvm")  # type: ignore[arg-type]
        assert second["parent"] == first["uid"]
        assert second["bytes_read"] == (1 + second["blocks_sampled"]) * OBJ
        with ceph_env.rados_ioctx(env, pool) as ioctx:
            names = [o.key for o in ioctx.list_objects() if o.key.startswith(prefix + "/")]
        assert sum(1 for n in names if n.startswith(f"{prefix}/blocks/")) == repo_env.stats()["objects"]

        for version in (first, second):
            snapshot = repo_env.ok("show", version["uid"], "--json").json()["snapshot"]  # type: ignore[index]
            if snapshot not in rbd.snapshots(image):
                continue  # the first version's snapshot went when the second was made
            target = rbd.name("from-rados")
            repo_env.ok("restore", version["uid"], rbd.spec(target), subprocess_=True)
            assert_same(rbd.export(target), rbd.export(image, snapshot))
        out = rbd.tmp / "first.img"
        repo_env.ok("restore", first["uid"], out)
        with open(out, "rb") as f:
            f.seek(10 * OBJ)
            assert f.read(OBJ) == bytes(OBJ)  # the object written after the first backup
            f.seek(9 * OBJ)
            assert f.read(5001) == b"x" * 5000 + b"\0"
    finally:
        with ceph_env.rados_ioctx(env, pool) as ioctx:
            for obj in list(ioctx.list_objects()):
                if obj.key.startswith(prefix + "/"):
                    ioctx.remove_object(obj.key)


def wait_for(what: str, check: Any, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the backup ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def test_radosgw_stopped_mid_backup(repo_env: RepoEnv, tmp_path: Path,
                                    s3_bucket: tuple[dict[str, str], str]) -> None:
    env, bucket = s3_bucket
    repo_env.use_config(s3_config(env, bucket))
    img = write_image(tmp_path / "big.img", ["rand"] * 50)  # 200 MiB of incompressible data
    endpoint = env["BACKYFS_TEST_S3_ENDPOINT"].split("//", 1)[1]

    # 200 MB at 20 MB/s: ten seconds, plenty of time to pull radosgw from under it.
    proc = repo_env.popen("backup", img, "vm", "--write-limit", "20")
    stopped = False
    try:
        wait_for("block objects in the bucket", lambda: len(bucket_keys(env, bucket, "blocks/")) >= 3,
                 proc, timeout=60)
        stopped = True
        ceph_env.rgw(env, "rgw-stop")
        stopped_at = time.monotonic()
        try:
            out, err = proc.communicate(timeout=FAILURE_BOUND_S + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"the backup still runs {FAILURE_BOUND_S + 30} s after radosgw stopped")
        took = time.monotonic() - stopped_at
        assert proc.returncode == 1, (proc.returncode, err)
        assert took < FAILURE_BOUND_S, f"the backup took {took:.0f} s to give up"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("backyfs: error: ") and endpoint in lines[0], lines[0]
        assert "Traceback" not in err and out == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if stopped:
            ceph_env.rgw(env, "rgw-start")

    # The backup is pending (not valid, not gone), and there is nothing to restore yet.
    versions = repo_env.versions()
    assert [v["state"] for v in versions] == ["pending"]
    pending = versions[0]["uid"]
    res = repo_env.call("restore", "vm", tmp_path / "nothing.img")
    assert res.rc == 1 and not (tmp_path / "nothing.img").exists()
    stored_before = len(bucket_keys(env, bucket, "blocks/"))
    assert 0 < stored_before < 50
    res = repo_env.run("backup", img, "vm", "--json", timeout=300)
    assert res.rc == 0, res.err
    stats = res.json()
    assert stats["uid"] == pending  # type: ignore[index]
    assert re.search(rf"\bresumed\b.*\b{pending}\b", res.err), res.err
    # What made it into the store before the outage is not sent again.
    assert stats["bytes_dedup"] >= OBJ  # type: ignore[index]
    assert stats["bytes_new"] + stats["bytes_dedup"] == 50 * OBJ  # type: ignore[index]
    assert [v["state"] for v in repo_env.versions()] == ["valid"]
    out_img = tmp_path / "restored.img"
    repo_env.ok("restore", pending, out_img)
    assert files_equal(out_img, img)


def test_a_body_that_stalls_is_fetched_again(tmp_path: Path) -> None:
    """botocore retries requests, not a response body that stalls after the headers (a read
    timeout inside Body.read()): the store retries that itself. A stub HTTP server on loopback
    stalls the first GET and answers the second."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from backyfs.storage.s3 import S3Store

    gets: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:  # the bucket exists
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            gets.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            if len(gets) == 1:
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(2.5)  # past the read timeout
            else:
                self.wfile.write(b"y" * 1000)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store("bkt", endpoint_url=f"http://127.0.0.1:{server.server_port}",
                        access_key="AKIAEXAMPLE", secret_key="SECRETSECRET", region="us-east-1",
                        path_style=True, read_timeout=1, max_attempts=3)
        assert store.get("blocks/aa/bb") == b"y" * 1000
        assert len(gets) == 2
    finally:
        server.shutdown()
