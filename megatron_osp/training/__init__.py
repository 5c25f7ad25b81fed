"""Pretraining: run configuration, data, the loop and its entry point."""
