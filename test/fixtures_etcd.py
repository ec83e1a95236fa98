"""A real etcd for the tests (written by the store work; placeholder until then)."""
