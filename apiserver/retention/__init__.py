"""Retention for the whole cluster, run by one elected API server replica (policy, plan, leader, runner)."""
