"""Scheduled jobs and the job monitor, through the real CLI in-process."""

from __future__ import annotations

import json
import os

from backyfs.cli.main import main
from backyfs.config import load_config, open_repository

MiB = 1 << 20


def _config(tmp_path, source) -> str:
    path = tmp_path / "backyfs.toml"
    path.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[jobs.good]
source = "{source}"
volume = "vm1"
labels = {{ tier = "gold" }}
keep = {{ last = 2 }}
[jobs.broken]
source = "{tmp_path / 'missing.img'}"
""")
    return str(path)


def test_job_runs_record_prune_and_monitor(tmp_path, capsys):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(2 * MiB))
    cfg = _config(tmp_path, image)
    for _ in range(3):
        assert main(["--config", cfg, "job", "run", "good"]) == 0
    versions = open_repository(load_config(cfg)).db.versions(volume="vm1")
    assert len(versions) == 2  # keep.last = 2 pruned the first
    assert versions[-1].labels == {"tier": "gold", "job": "good"}
    assert main(["--config", cfg, "job", "run", "broken"]) == 1
    capsys.readouterr()
    assert main(["--config", cfg, "jobs", "--json"]) == 3
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["version"] == versions[-1].uid
    assert rows["broken"]["status"] == "failed"
    assert "missing.img" in rows["broken"]["message"]


def test_monitor_reports_a_died_run_and_unknown_job(tmp_path, capsys):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    cfg = _config(tmp_path, image)
    repo = open_repository(load_config(cfg))
    dead_pid = 2**22 + 12345  # above pid_max on Debian's default: never a live process
    repo.db.start_job_run("good", dead_pid)
    assert main(["--config", cfg, "jobs", "--json"]) == 3
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "died"
    assert main(["--config", cfg, "job", "run", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown job 'nope'" in err


def test_monitor_reports_a_hung_run_and_forgets_removed_jobs(tmp_path, capsys):
    """A run still 'running' (its pid alive: here our own) after max_age_hours is 'hung', not a green
    'running' for ever; a job no longer in the config is not reported overdue for ever."""
    import time

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    cfg = _config(tmp_path, image)
    repo = open_repository(load_config(cfg))
    run_id = repo.db.start_job_run("good", os.getpid())
    with repo.db._tx() as conn:
        conn.execute("UPDATE job_runs SET started = ? WHERE id = ?", (time.time() - 5 * 86400, run_id))
    repo.db.start_job_run("removed-from-config", 2**22 + 12345)
    assert main(["--config", cfg, "jobs", "--json"]) == 3
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "hung"
    assert "removed-from-config" not in rows


def test_a_job_with_bad_args_is_a_failed_run(tmp_path, capsys):
    """A typo in a job's `args` is recorded as a failed run (the monitor goes red), in one line,
    not a usage screen that leaves the job looking as if it never ran."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    cfg = _config(tmp_path, image)
    with open(cfg, "a") as f:
        f.write(f'[jobs.typo]\nsource = "{image}"\nargs = ["--bogus"]\n')
    assert main(["--config", cfg, "job", "run", "typo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job typo: bad args: unrecognized arguments: --bogus" in err, err
    assert main(["--config", cfg, "jobs", "--json"]) == 3
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["typo"]["status"] == "failed" and "--bogus" in rows["typo"]["message"]


def test_an_overlapping_start_refused_is_not_the_jobs_last_run(tmp_path, capsys):
    """A second start while the job runs (a timer and a hand) is refused, and was then recorded as
    the job's newest run, failed: the monitor alarmed although the running backup succeeded."""
    from backyfs.repository.locks import lock_volume

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    cfg = _config(tmp_path, image)
    assert main(["--config", cfg, "job", "run", "good"]) == 0
    held = lock_volume(load_config(cfg).db_path, "vm1")  # the running one holds the volume's lock
    try:
        assert main(["--config", cfg, "job", "run", "good"]) == 1
    finally:
        held.close()
    assert "already running" in capsys.readouterr().err
    main(["--config", cfg, "jobs", "--json"])
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "ok"


def test_a_jobs_old_runs_are_forgotten_but_its_last_good_one(tmp_path, capsys):
    """Each job keeps its newest KEEP_JOB_RUNS runs and its newest successful one (what the monitor
    reads); other jobs' runs are untouched. The monitor still tells the last good run's age."""
    from backyfs.metadata.db import KEEP_JOB_RUNS

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    cfg = _config(tmp_path, image)
    db = open_repository(load_config(cfg)).db
    good = db.start_job_run("good", 1)
    db.finish_job_run(good, True, "0123456789ab", "")
    other = db.start_job_run("broken", 1)
    db.finish_job_run(other, False, None, "first")
    failed = []
    for _ in range(KEEP_JOB_RUNS + 5):
        failed.append(db.start_job_run("good", 1))
        db.finish_job_run(failed[-1], False, None, "disk gone")
    with db._tx() as conn:
        kept = [r[0] for r in conn.execute("SELECT id FROM job_runs WHERE job = 'good' ORDER BY id")]
        assert conn.execute("SELECT count(*) FROM job_runs WHERE job = 'broken'").fetchone()[0] == 1
    assert kept == [good, *failed[-KEEP_JOB_RUNS:]]
    last = db.last_job_runs()["good"]
    assert last["id"] == failed[-1] and last["last_ok"] is not None
    assert main(["--config", cfg, "jobs", "--json"]) == 3
    rows = {r["job"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "failed" and rows["good"]["message"] == "disk gone"
