"""Fronts: thin adapters (FUSE) over the export core."""
