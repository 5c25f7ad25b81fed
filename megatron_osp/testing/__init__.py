"""Helpers for tests: distributed code on CPU (distributed.py, comm_count.py), how a multi-rank run is
compared with one process (equivalence.py), small tokenizers (tokenizers.py), stand-in commands for the
shell scripts' tests (commands.py)."""
