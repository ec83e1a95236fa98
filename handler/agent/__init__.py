"""coredump-agent: the DaemonSet process that owns core_pattern, the shim, the spool, retention, Events and metrics."""
