"""Export layer: any version as a synchronous, thread-safe copy-on-write block device."""
