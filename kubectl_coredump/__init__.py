"""kubectl coredump: the kubectl plugin that lists, describes, downloads and debugs core dumps."""
