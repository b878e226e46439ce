"""The inference tests use the runtime stack fixtures of ``tests/conftest.py``."""
