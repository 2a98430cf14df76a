"""Matching: the pure engine (exact incremental top-k), screening, scoring and reasons."""
