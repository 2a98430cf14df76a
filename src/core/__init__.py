"""Matchmaker core: domain, engine, data layer, settings and observability."""
