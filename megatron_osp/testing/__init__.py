"""Helpers for testing distributed code on CPU."""
