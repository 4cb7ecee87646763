"""backyfs: block-based, deduplicating VM disk backups that can be booted and mounted."""

__version__ = "0.1.0"
