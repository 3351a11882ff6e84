"""reindex_qdrant: plan.py (the SQL, pure), engine.py (the batches, each one transaction)."""
