"""Metadata: the SQLite index of versions, labels, block maps and known objects."""
