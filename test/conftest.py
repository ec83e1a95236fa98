"""
Fixtures every topic shares: a real etcd (``fixtures_etcd.py``), a running API server (``fixtures_apiserver.py``)
and the fake kube-apiserver (``fake_kube.py``), registered as plugins so each topic's tests get them by name.

Test folders have no ``__init__.py`` (``test`` is a stdlib package name), so pytest puts this folder on
``sys.path`` and these modules import by their plain names. Helpers are imported explicitly from uniquely
named modules (``waiting``, ``fixtures_apiserver``, ``handler/handler_harness``, ``plugin/plugin_harness``,
``deploy/deploy_helpers``, ``vm/vm_harness``), never from a ``conftest``, so one pytest run may collect
several folders.
"""

pytest_plugins = ["fixtures_etcd", "fixtures_apiserver", "fake_kube"]
