"""The repository: content-addressed blocks in a store, versions and block maps in the metadata DB."""

from backyfs.repository.repo import Repository

__all__ = ["Repository"]
