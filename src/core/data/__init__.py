"""Data layer: connections, the repository, named SQL and the migration runner."""
