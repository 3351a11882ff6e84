"""run_backup: the steps that make a recovery point trustworthy.

recovery_point.py (the run: the order of the steps, its BackupRun context, the manifest that records
it), run.py (preflight, locks, leftovers, the dump in the snapshot the facts were read in, read-back
verification), pipeline.py (pg_dump -> zstd -> AES-GCM -> repository, streamed), facts.py (what the
manifest records, read in the dump's snapshot), lock.py (the purpose of the advisory lock: one backup
of a database at a time). The attachments mirror (the bucket into the repository's pool) is
core/repository/mirror.py: a restore protects orphaned users' blobs with it too.
"""
