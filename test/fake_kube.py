"""An in-test fake of the kube-apiserver endpoints this project calls (placeholder until the auth work lands)."""
