"""Kubernetes API machinery: conventions, the CoredumpEndpoint resource, discovery, OpenAPI, tables."""
