"""backup_status: one check per component; common.py (Check, StatusContext), database.py,
stores.py, repository.py."""
