"""Storage: accounts and API keys in SQLAlchemy 2, SQLite by default, PostgreSQL by URL. `crud` commits."""
