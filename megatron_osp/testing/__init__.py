"""Helpers for tests: distributed code on CPU (distributed.py, comm_count.py), small tokenizers (tokenizers.py)."""
