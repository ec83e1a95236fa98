"""A running coredump-apiserver for the tests (placeholder until the server lands)."""
