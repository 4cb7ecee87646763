"""Configuration: one TOML file, found by --config, $BACKYFS_CONFIG, or the embedded default.

The embedded default keeps everything in one data directory ($BACKYFS_DATA_DIR, else
/var/lib/backyfs for root and ~/.local/share/backyfs for other users): the store in store/, the
metadata in backyfs.sqlite, the read cache in cache/.

    data_dir = "/var/lib/backyfs"
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

import os
import re
from dataclasses import dataclass, field

from backyfs.errors import ConfigError

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
    if os.environ.get(ENV_DATA_DIR):
        return os.environ[ENV_DATA_DIR]
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
    path = path or os.environ.get(ENV_CONFIG)
    if not path:
        return Config()
    import tomllib  # here, not at the top: ~10 ms that a run on the embedded default never needs

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return _from_dict(raw, path)


def _from_dict(raw: dict, path: str) -> Config:
    known = {"data_dir", "block_size", "threads", "compression_level", "store", "limits", "cache", "jobs"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    try:
        cfg = Config(source=path)
        if "data_dir" in raw:
            cfg.data_dir = os.path.expanduser(str(raw["data_dir"]))
        cfg.block_size = parse_size(raw.get("block_size", cfg.block_size))
        cfg.threads = int(raw.get("threads", cfg.threads))
        cfg.compression_level = int(raw.get("compression_level", cfg.compression_level))
        cfg.store = dict(raw.get("store", cfg.store))
        cfg.jobs = {str(k): dict(v) for k, v in raw.get("jobs", {}).items()}
        limits, cache = raw.get("limits", {}), raw.get("cache", {})
        cfg.read_mb_s = float(limits.get("read_mb_s", 0))
        cfg.write_mb_s = float(limits.get("write_mb_s", 0))
        cfg.cache_memory_mb = int(cache.get("memory_mb", cfg.cache_memory_mb))
        cfg.cache_disk_mb = int(cache.get("disk_mb", cfg.cache_disk_mb))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    bs = cfg.block_size
    if bs < 64 * 1024 or bs > 64 << 20 or bs & (bs - 1):
        raise ConfigError(f"config {path}: block_size must be a power of two from 64KiB to 64MiB")
    if cfg.threads < 1 or cfg.threads > 64:
        raise ConfigError(f"config {path}: threads must be 1 to 64")
    if cfg.store.get("type", "fs") not in ("fs", "s3", "rados"):
        raise ConfigError(f"config {path}: store type must be fs, s3 or rados")
    return cfg


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


def open_repository(cfg: Config, **limits: float | None):
    from backyfs.metadata.db import MetadataDB
    from backyfs.repository.repo import Repository

    os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
    store = open_store(cfg, **limits)
    return Repository(store, MetadataDB(cfg.db_path), cfg.compression_level)
