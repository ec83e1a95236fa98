"""Aggregated Kubernetes API server for ``coredump.example.io``: CoredumpEndpoint objects and their dumps."""
