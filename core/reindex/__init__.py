"""reindex_qdrant: run.py (the run: checks, the lock of a confirmed run, the report), plan.py (the
SQL of the batches, pure), engine.py (the batches, each one transaction)."""
