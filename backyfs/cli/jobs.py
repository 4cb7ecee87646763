"""Scheduled backups: `job run NAME` (what systemd timers call) and `jobs`, the job monitor.

Jobs are [jobs.NAME] tables in the config (source, volume, labels, args, max_age_hours, keep).
Each run is recorded in the metadata DB; the monitor reports each configured job's last run and
exits 3 when one failed, died (its process is gone while the run says 'running'), hung (still
running after max_age_hours), is overdue (no good run within max_age_hours) or never ran, so a
monitoring system can call it as a check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

from backyfs.cli.commands import DataProblem, _print_json, run_backup
from backyfs.config import load_config, open_repository
from backyfs.errors import AlreadyRunning, BackyfsError, ConfigError, Terminated


def _job(cfg, name: str) -> dict:
    if name not in cfg.jobs:
        known = ", ".join(sorted(cfg.jobs)) or "none configured"
        raise ConfigError(f"unknown job {name!r} (jobs: {known})")
    return cfg.jobs[name]  # load_config checked its settings: it has a source


def _backup_argv(name: str, job: dict) -> list[str]:
    argv = ["backup", str(job["source"]), str(job.get("volume", name))]
    for key, value in job.get("labels", {}).items():
        argv += ["--label", f"{key}={value}"]
    return argv + ["--label", f"job={name}"] + [str(a) for a in job.get("args", [])]


def _parse_job_argv(parser: argparse.ArgumentParser, argv: list[str], name: str) -> argparse.Namespace:
    """The job's backup command line; a bad one (its `args` setting) is a failed run of the job
    with argparse's complaint as the message, not a usage screen nobody reads under systemd."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return parser.parse_args(argv)
    except SystemExit:
        lines = complaint.getvalue().strip().splitlines()
        reason = lines[-1].split(": error: ", 1)[-1] if lines else "cannot parse"
        raise ConfigError(f"job {name}: bad args: {reason}") from None


def cmd_job_run(args: argparse.Namespace) -> int:
    from backyfs.cli.housekeeping import prune_volume
    from backyfs.cli.main import build_parser
    from backyfs.repository.retention import Policy

    cfg = load_config(args.config)
    job = _job(cfg, args.name)
    config_argv = ["--config", args.config] if args.config else []
    repo = open_repository(cfg)
    run_id = repo.db.start_job_run(args.name, os.getpid())
    try:
        backup_args = _parse_job_argv(build_parser(), config_argv + _backup_argv(args.name, job), args.name)
        version, _parent = run_backup(backup_args)
    except AlreadyRunning:  # an overlapping start (timer and hand): the running one is the run
        repo.db.forget_job_run(run_id)
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            message = "terminated" if isinstance(exc, Terminated) else "interrupted"
        else:
            message = str(exc) if isinstance(exc, BackyfsError) else f"{type(exc).__name__}: {exc}"
        repo.db.finish_job_run(run_id, False, None, message)
        raise
    repo.db.finish_job_run(run_id, True, version.uid, "")
    print(f"job {args.name}: version {version.uid} of {version.volume} in {version.stats['seconds']:.1f} s")
    keep = job.get("keep")
    if keep:
        policy = Policy(**{k: int(v) for k, v in keep.items()})
        prune_volume(cfg, repo, version.volume, policy, prefix=f"job {args.name}: ")
    return 0


def _status(run: dict | None, job: dict, now: float) -> str:
    if run is None:
        return "never run"
    max_age = float(job.get("max_age_hours", 26)) * 3600
    if run["state"] == "running":
        try:
            os.kill(run["pid"], 0)
        except ProcessLookupError:
            return "died"
        except PermissionError:
            pass
        # A run that hangs (or whose pid was reused) must not keep the monitor green for ever.
        return "running" if now - run["started"] <= max_age else "hung"
    if run["state"] == "failed":
        return "failed"
    return "overdue" if run["last_ok"] is None or now - run["last_ok"] > max_age else "ok"


def _duration(run: dict | None) -> float | None:
    return round(run["finished"] - run["started"], 1) if run and run["finished"] else None


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # No repository yet (or a mistyped data dir): every job never ran; none is made by looking.
    runs = open_repository(cfg).db.last_job_runs() if os.path.exists(cfg.db_path) else {}
    now = time.time()
    rows = []
    for name in sorted(cfg.jobs):  # a job taken out of the config is no longer watched
        run = runs.get(name)
        rows.append({"job": name, "status": _status(run, cfg.jobs.get(name, {}), now),
                     "started": run["started"] if run else None,
                     "seconds": _duration(run),
                     "version": run["version_uid"] if run else None,
                     "message": run["message"] if run else ""})
    if args.json:
        _print_json(rows)
    else:
        print(f"{'JOB':<20}  {'STATUS':<9}  {'STARTED':<19}  {'SECONDS':>7}  {'VERSION':<12}  MESSAGE")
        for r in rows:
            started = _when(r["started"])
            print(f"{r['job']:<20}  {r['status']:<9}  {started:<19}  {r['seconds'] or '-':>7}  "
                  f"{r['version'] or '-':<12}  {r['message']}")
    bad = [r["job"] for r in rows if r["status"] not in ("ok", "running")]
    if bad:
        print(f"backyfs: jobs needing attention: {', '.join(bad)}", file=sys.stderr)
        raise DataProblem(f"{len(bad)} job(s) failed, died, hung, are overdue or never ran")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="run a configured backup job (what systemd timers call)",
                       description="Run the backup job [jobs.NAME] of the config, record the run for "
                       "`backyfs jobs`, and prune by the job's keep policy after a good run.")
    job_sub = p.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    run = job_sub.add_parser("run", help="run one job now", description=(
        "Back up the source of [jobs.NAME] (its volume, labels and args), record the run for "
        "'backyfs jobs', then remove the volume's versions its keep policy does not keep. "
        "systemd's backyfs-backup@NAME.service runs this. A failed run exits non-zero and is "
        "shown as failed by the monitor; an interrupted one leaves a pending version the next "
        "run resumes."))
    run.add_argument("name", metavar="NAME", help="a [jobs.NAME] table of the config")
    run.set_defaults(func=cmd_job_run)
    p = sub.add_parser("jobs", help="job monitor: the last run of every job (exit 3 on trouble)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON (one object per job)")
    p.set_defaults(func=cmd_jobs)
