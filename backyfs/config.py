"""Configuration: one TOML file, found by --config, $BACKYFS_CONFIG, or the embedded default.

The embedded default keeps everything in one data directory ($BACKYFS_DATA_DIR, else
/var/lib/backyfs for root and ~/.local/share/backyfs for other users): the store in store/, the
metadata in backyfs.sqlite, the read cache in cache/.

    data_dir = "/var/lib/backyfs"    # relative: to this file's directory
    block_size = "4MiB"        # for new volumes
    threads = 4                # parallel reads, hashes and writes
    compression_level = 1      # zstd level; 0 stores raw

    [store]
    type = "fs"                # fs | s3 | rados
    path = "/var/lib/backyfs/store"   # fs only; default data_dir/store
    # s3:    bucket, prefix, endpoint_url, region, access_key, secret_key, path_style
    # rados: pool, conffile, prefix

    [limits]
    read_mb_s = 0              # 0: unlimited
    write_mb_s = 0

    [cache]
    memory_mb = 256
    disk_mb = 4096             # 0 disables the disk cache (never used over a local fs store)

    [jobs.vm1-root]            # run by `backyfs job run vm1-root` (systemd/backyfs-backup@.timer)
    source = "/dev/vg0/vm1-root"
    volume = "vm1-root"
    labels = { tier = "gold" }
    max_age_hours = 26         # `backyfs jobs` fails when the last good run is older
    keep = { last = 7, daily = 14, weekly = 8 }   # prune after each good run
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from backyfs.errors import ConfigError
from backyfs.fsutil import makedirs_private

ENV_CONFIG = "BACKYFS_CONFIG"
ENV_DATA_DIR = "BACKYFS_DATA_DIR"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: use e.g. 4MiB")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def default_data_dir() -> str:
    if ENV_DATA_DIR in os.environ:
        if not os.environ[ENV_DATA_DIR].strip():  # set but empty: a script's missing variable
            raise ConfigError(f"${ENV_DATA_DIR} is set but empty")
        return os.path.abspath(os.environ[ENV_DATA_DIR])
    if os.geteuid() == 0:
        return "/var/lib/backyfs"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "backyfs")


@dataclass
class Config:
    data_dir: str = field(default_factory=default_data_dir)
    block_size: int = 4 << 20
    threads: int = 4
    compression_level: int = 1
    store: dict = field(default_factory=lambda: {"type": "fs"})
    read_mb_s: float = 0.0
    write_mb_s: float = 0.0
    cache_memory_mb: int = 256
    cache_disk_mb: int = 4096
    jobs: dict = field(default_factory=dict)  # name -> {source, volume, labels, max_age_hours, ...}
    source: str = "embedded default"

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "backyfs.sqlite")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.data_dir, "cache")

    @property
    def overlay_dir(self) -> str:
        return os.path.join(self.data_dir, "overlays")


def load_config(path: str | None = None) -> Config:
    if path is not None and not path.strip():  # `--config "$CONF"` of an unset variable
        raise ConfigError("--config is empty: name a config file")
    if path is None and ENV_CONFIG in os.environ:
        path = os.environ[ENV_CONFIG]
        if not path.strip():  # set but empty, as $BACKYFS_DATA_DIR: not the embedded default
            raise ConfigError(f"${ENV_CONFIG} is set but empty")
    if path is None:
        return Config()
    import tomllib  # here, not at the top: ~10 ms that a run on the embedded default never needs

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes itself
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start})") from None
    return _from_dict(raw, path)


# Every setting and its type, per table: a typo or a wrong type is an error that names the setting,
# never a silently ignored key or a default used instead. float accepts integers too.
_TOP = {"data_dir": str, "block_size": (str, int), "threads": int, "compression_level": int,
        "store": dict, "limits": dict, "cache": dict, "jobs": dict}
_LIMITS = {"read_mb_s": float, "write_mb_s": float}
_CACHE = {"memory_mb": int, "disk_mb": int}
_STORES: dict[str, dict[str, type | tuple]] = {
    "fs": {"type": str, "path": str, "fsync": bool},
    "s3": {"type": str, "bucket": str, "prefix": str, "endpoint_url": str, "region": str,
           "access_key": str, "secret_key": str, "path_style": bool, "parallelism": int,
           "max_attempts": int, "connect_timeout": float, "read_timeout": float, "create_bucket": bool},
    "rados": {"type": str, "pool": str, "conffile": str, "prefix": str, "cluster_name": str,
              "client_name": str, "namespace": str, "connect_timeout": int, "op_timeout": int},
}
_REQUIRED = {"s3": "bucket", "rados": "pool"}
_JOB = {"source": str, "volume": str, "labels": dict, "args": list, "max_age_hours": float, "keep": dict}
_KEEP = {"last": int, "daily": int, "weekly": int, "monthly": int}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table", list: "a list"}


def _is(value: object, kind: type) -> bool:
    if isinstance(value, bool):  # TOML booleans are Python ints: only bool takes them
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _check(table: object, where: str, schema: dict[str, type | tuple]) -> dict:
    """TABLE itself, once it is a table with only SCHEMA's keys, each of its type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(schema))})")
    for key, value in table.items():
        kinds = schema[key] if isinstance(schema[key], tuple) else (schema[key],)
        if not any(_is(value, kind) for kind in kinds):
            wanted = " or ".join(_TYPE_NAMES[kind] for kind in kinds)
            # Name a secret's type, never its value: the error may end up in a log.
            shown = _TYPE_NAMES.get(type(value), type(value).__name__) if "secret" in key else repr(value)
            raise ConfigError(f"{where}: {key} must be {wanted}, not {shown}")
        if isinstance(value, float) and not math.isfinite(value):  # a timeout of nan, a label of inf
            raise ConfigError(f"{where}: {key} must be a finite number, not {value}")
    return table


def _refuse_nul(value: object, where: str, name: str = "") -> None:
    """A NUL in any string of the config (TOML writes one as \\u0000) is refused naming the setting:
    a path, a source or an argument with one fails much later, in the OS ('embedded null byte')."""
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{where}: {name} must not contain a NUL character")
    if isinstance(value, dict):
        for key, item in value.items():
            full = f"{name}.{key}" if name else key
            if "\0" in key:  # a job's name, a label's
                raise ConfigError(f"{where}: the name {ascii(full)} must not contain a NUL character")
            _refuse_nul(item, where, full)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_nul(item, where, f"{name}[{index}]")


def _in_range(where: str, key: str, value: float, low: float, high: float | None = None) -> None:
    # nan compares false with everything, so it passed every bound (max_age_hours = nan: never overdue)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise ConfigError(f"{where}: {key} must be {bounds}, not {value:g}")


def _from_dict(raw: dict, path: str) -> Config:
    where = f"config {path}"
    _refuse_nul(raw, where)
    _check(raw, where, _TOP)
    cfg = Config(source=path)
    if "data_dir" in raw:
        if not raw["data_dir"].strip():
            raise ConfigError(f"{where}: data_dir must not be empty")
        # A relative data_dir is the config file's neighbour, not wherever the command runs.
        here = os.path.dirname(os.path.abspath(path))
        cfg.data_dir = os.path.join(here, os.path.expanduser(raw["data_dir"]))
    try:
        cfg.block_size = parse_size(raw.get("block_size", cfg.block_size))
    except ConfigError as exc:
        raise ConfigError(f"{where}: block_size: {exc}") from None
    bs = cfg.block_size
    if bs < 64 * 1024 or bs > 64 << 20 or bs & (bs - 1):
        raise ConfigError(f"{where}: block_size must be a power of two from 64KiB to 64MiB")
    cfg.threads = raw.get("threads", cfg.threads)
    _in_range(where, "threads", cfg.threads, 1, 64)
    cfg.compression_level = raw.get("compression_level", cfg.compression_level)
    _in_range(where, "compression_level", cfg.compression_level, 0, 22)  # zstd's; 0 stores raw
    cfg.store = _store(raw.get("store", cfg.store), where)
    limits = _check(raw.get("limits", {}), f"{where}: [limits]", _LIMITS)
    cfg.read_mb_s, cfg.write_mb_s = (float(limits.get(k, 0)) for k in ("read_mb_s", "write_mb_s"))
    for key in _LIMITS:
        _in_range(f"{where}: [limits]", key, limits.get(key, 0), 0)
    cache = _check(raw.get("cache", {}), f"{where}: [cache]", _CACHE)
    cfg.cache_memory_mb = cache.get("memory_mb", cfg.cache_memory_mb)
    cfg.cache_disk_mb = cache.get("disk_mb", cfg.cache_disk_mb)
    _in_range(f"{where}: [cache]", "memory_mb", cfg.cache_memory_mb, 16)
    _in_range(f"{where}: [cache]", "disk_mb", cfg.cache_disk_mb, 0)
    cfg.jobs = _jobs(raw.get("jobs", {}), where)
    return cfg


def _store(store: object, where: str) -> dict:
    if not isinstance(store, dict):
        raise ConfigError(f"{where}: [store] must be a table")
    kind = store.get("type", "fs")
    if not isinstance(kind, str) or kind not in _STORES:
        raise ConfigError(f"{where}: store type must be fs, s3 or rados, not {kind!r}")
    _check(store, f"{where}: [store] of type {kind}", _STORES[kind])
    if kind in _REQUIRED and _REQUIRED[kind] not in store:
        raise ConfigError(f"{where}: [store] of type {kind} needs {_REQUIRED[kind]}")
    url = store.get("endpoint_url")
    if url is not None:
        _check_endpoint(url, where)
    if ("access_key" in store) != ("secret_key" in store):
        raise ConfigError(f"{where}: [store] needs both access_key and secret_key, or neither (then "
                          "boto3 finds credentials itself: environment, profile, instance role)")
    return dict(store)


def _check_endpoint(url: str, where: str) -> None:
    """http(s)://HOST[:PORT][/path], whole: a space or a half bracket passed a prefix match and
    crashed boto3, and credentials in the URL were printed in its error messages."""
    from urllib.parse import urlsplit

    bad = f"{where}: [store] endpoint_url must be http://HOST[:PORT] or https://HOST[:PORT]"
    authority = url.split("/", 3)[2] if url.count("/") >= 2 else url
    if "@" in authority:  # user:password@ maybe: never echo it
        raise ConfigError(f"{bad}, without credentials in it: use access_key and secret_key")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ConfigError(f"{bad}, not {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"{bad}, not {url!r}") from None
    host = parts.hostname or ""
    label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"  # botocore's rule: it refuses others with a traceback
    ipv6 = ":" in host and re.fullmatch(r"[0-9a-f:.]+", host)
    if not (re.fullmatch(rf"({label}\.)*{label}", host) or ipv6):
        raise ConfigError(f"{bad}, not {url!r}")


def _jobs(jobs: object, where: str) -> dict:
    if not isinstance(jobs, dict):
        raise ConfigError(f"{where}: [jobs] must be a table")
    out = {}
    for name, job in jobs.items():
        job_where = f"{where}: [jobs.{name}]"
        _check(job, job_where, _JOB)
        if "source" not in job:
            raise ConfigError(f"{job_where} needs a source")
        for key, count in _check(job.get("keep", {}), f"{job_where} keep", _KEEP).items():
            _in_range(f"{job_where} keep", key, count, 0)
        labels = job.get("labels", {})
        _check(labels, f"{job_where} labels", dict.fromkeys(labels, (str, int, float)))
        if "max_age_hours" in job:
            _in_range(job_where, "max_age_hours", job["max_age_hours"], 0.01)
        out[str(name)] = dict(job)
    return out


def open_store(cfg: Config, *, read_mb_s: float | None = None, write_mb_s: float | None = None):
    """The configured backend, wrapped in rate limits when any are set."""
    from backyfs.storage.ratelimit import RateLimitedStore

    opts = {k: v for k, v in cfg.store.items() if k != "type"}
    kind = cfg.store.get("type", "fs")
    try:
        if kind == "fs":
            from backyfs.storage.fs import FilesystemStore

            store = FilesystemStore(opts.pop("path", os.path.join(cfg.data_dir, "store")), **opts)
        elif kind == "s3":
            from backyfs.storage.s3 import S3Store

            store = S3Store(max_pool=max(10, cfg.threads * 2), **opts)
        else:
            from backyfs.storage.rados import RadosStore

            store = RadosStore(**opts)
    except TypeError as exc:
        raise ConfigError(f"config {cfg.source}: [store] {exc}") from None
    read = cfg.read_mb_s if read_mb_s is None else read_mb_s
    write = cfg.write_mb_s if write_mb_s is None else write_mb_s
    if read or write:
        store = RateLimitedStore(store, write_bytes_s=write * 1e6, read_bytes_s=read * 1e6)
    return store


def require_repository(cfg: Config) -> None:
    """Commands that read a repository refuse a data directory without one: a typo in --config or
    $BACKYFS_DATA_DIR must not show an empty new repository as if the backups were gone."""
    try:
        os.stat(cfg.db_path)
    except PermissionError:  # not "no repository": that would advise init or rebuild-db over it
        raise ConfigError(f"cannot read the repository in {cfg.data_dir}: permission denied "
                          "(it is another user's; run as its owner)") from None
    except OSError:
        raise ConfigError(f"no repository in {cfg.data_dir} (no {os.path.basename(cfg.db_path)}): check "
                          f"--config and ${ENV_DATA_DIR}; 'backyfs init' or a first backup makes one, "
                          "'backyfs rebuild-db' recovers one from its store") from None


def open_repository(cfg: Config, **limits: float | None):
    from backyfs.metadata.db import MetadataDB
    from backyfs.repository.repo import Repository

    try:
        makedirs_private(cfg.data_dir)
    except OSError as exc:
        raise ConfigError(f"cannot use data directory {cfg.data_dir}: {exc.strerror}") from None
    store = open_store(cfg, **limits)
    import logging

    logging.getLogger(__name__).debug("config: %s; store: %s; metadata: %s", cfg.source,
                                      store.url, cfg.db_path)
    return Repository(store, MetadataDB(cfg.db_path), cfg.compression_level)
