"""Alembic's entry point: migrations run on the connection lorag/state/database.py hands
over (inside its transaction), never on one of their own."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None,
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
