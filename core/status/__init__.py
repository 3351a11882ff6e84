"""backup_status and list_backups: what the deployment's backups are worth right now.

backup_status: one check per component; common.py (Check, StatusContext), database.py, stores.py,
repository.py. list_backups (and the resources, the prompt and `engram-recovery backups`):
catalog.py, every recovery point with its verification, drill and retention fate.
"""
