"""Matchmaker core: what runs in Lambda, by layer: api (operations), queue (the worker),
matching (the pure engine), embedding, data (PostgreSQL); plus the shared models,
settings, observability and AWS adapters."""
