"""``python -m apiserver`` runs the server like ``coredump-apiserver``."""

import sys

from apiserver.cli import main

sys.exit(main())
