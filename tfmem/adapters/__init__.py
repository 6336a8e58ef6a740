"""Adapters translate a Recipe into a framework's own machinery. No adapter imports another."""
