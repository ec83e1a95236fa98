"""Node side of coredump.example.io: the storage layout contract, the core_pattern handler, the shim and the agent."""
