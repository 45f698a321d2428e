"""Fakes of the worker's infrastructure for tests: the in-memory broker (held to the Redis
broker by ``tests/integration/test_broker_contract.py``), a manual clock, and metrics that keep
every observation."""
