"""lorag's durable state: one database behind every replica (lorag/state/database.py), its
tables (schema.py) and their versioned migrations (migrations/, Alembic)."""

from lorag.state.database import Database, state_url

__all__ = ["Database", "state_url"]
