"""Results: the resumable store, queries and tables over it, shipped rows."""
