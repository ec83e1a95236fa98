"""API storage: where CoredumpEndpoint objects live (etcd or memory) and the rules for changing them."""
