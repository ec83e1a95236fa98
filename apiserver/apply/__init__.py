"""
Server-side apply and ``metadata.managedFields`` for CoredumpEndpoint, as kube-apiserver does them for a
custom resource (k8s.io/apiserver's fieldmanager on top of sigs.k8s.io/structured-merge-diff).

:mod:`.fieldset` knows the shape of the object (which parts are granular, which are atomic) and
computes field sets, comparisons, merges and removals on it; :mod:`.managed` keeps the managedFields
entries (decode, validate, encode) and records an ``Update`` or ``Apply`` operation on a write, raising
the 409 conflict kube-apiserver raises.

Why our own code: structured-merge-diff exists only in Go (nothing on PyPI implements it), and this kind's
schema is small and fixed (labels, annotations, finalizers, ownerReferences, ``spec.podUID``), so a
minimal implementation of the same rules for that schema is a few hundred lines, where a Go sidecar or
cgo bridge would add a process and a toolchain to every deployment.
"""
