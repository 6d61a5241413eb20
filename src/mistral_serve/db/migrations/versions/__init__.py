"""Migration revisions, in order; alembic reads them by path."""
