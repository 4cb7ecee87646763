"""Object stores: a small interface (put, get, exists, delete, list) and backends behind it.

Wrappers (compression, rate limits, retries) wrap a store rather than adding flags to it.
"""

from backyfs.storage.base import ObjectStore

__all__ = ["ObjectStore"]
