"""
Fixtures every topic shares: a real etcd (``fixtures_etcd.py``) and a running API server (``fixtures_apiserver.py``).

Test folders have no ``__init__.py`` (``test`` is a stdlib package name), so pytest puts this folder on
``sys.path`` and these modules import by their plain names.
"""
from fixtures_etcd import *  # noqa: F401,F403
from fixtures_apiserver import *  # noqa: F401,F403
from fake_kube import *  # noqa: F401,F403
