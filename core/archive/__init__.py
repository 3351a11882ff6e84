"""Continuous archiving (point-in-time recovery): what the server must have before WAL can be archived.

prerequisites.py: check_archiving's use case, each prerequisite (wal_level, senders, slots, a
replication role, pg_hba) judged from one read of the server, with the exact change for Engram's
compose stack and for a bare host. The engine itself, Barman, is reached through stores/barman.py
(its commands) and stores/barman_catalog.py (its backups, WAL and the restorable window); docs/pitr.md
says why Barman and how the restore tools will use it.
"""
