"""Submitting a defense: load user code, pick a suite, run it, sweep epsilon, verify an entry,
all optionally in a resource-limited child process (``sandbox``)."""
