"""The command line: argument parsing, output, and mapping errors to exit codes."""
