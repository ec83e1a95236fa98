"""
The ``dump`` archive: a pod's cores as one tar.gz, assembled from gzip members without recompressing.

:mod:`.query` validates what the client asks for, :mod:`.plan` lays the archive out byte for byte
before anything is sent (so ``Content-Length``, ``ETag`` and ``Range`` are known up front), and
:mod:`.stream` produces the bytes of any range of that plan.
"""
