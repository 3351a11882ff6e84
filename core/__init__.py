"""The domain code, one room per concern (docs/architecture.md has the layers and each use case's path).

The top holds the kernel only: errors.py, settings.py, progress.py, taskgroups.py, verdict.py, and
runtime.py (what a server shares between calls). Below it, by layer: backup/, restore/, status/ (the
use cases), reindex/, repository/, artifact/, engram/, stores/. `lint-imports` (scripts/test) keeps
the order.
"""
