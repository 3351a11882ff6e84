"""plan_restore, run_restore, restore_drill and the decrypt command.

run_restore: run.py (the use case: the token's premises re-checked, the step log, resume) and
run_steps.py (the steps in Engram's order, each saying what it changed).

plan_restore: planner.py (the run) gathers (observe.py, I/O only) and judges (plan.py, steps.py,
token.py: pure). restore_drill: drill_run.py (the run, its steps and its record), drill.py (the
scratch database, the proofs); it restores with database.py, as a real restore does. decrypt.py: a
recovery point's dump back into the stock file pg_dump wrote.

The engines run_restore (issue 13) and the drill share: database.py restores a backup's dump into
an empty database with stock pg_restore (rows loading while the artifact decrypts, post-data with
--jobs; feed.py runs the clients on one decrypted stream) and schema_check.py proves every table,
constraint, index and row count came back; copy_back.py puts a backup's attachments back into a bucket,
each blob checked against its recorded checksum, resumable.

fences.py: what run_restore puts back on the restored database before the app boots: snapshot_live
reads the live database first (ids and counters only; never raises, says what it could not read, per
tenant under row-level security); fence_tokens keeps dead the refresh tokens and API keys that died
after the backup (or revokes every refresh token when live is unreadable); fence_sync moves every
vault's change_seq past the live head; protect_orphans copies the blobs of users only the bucket knows
into the repository (repository/mirror.py, under protected/<run_id>/) before OrphanSweep deletes them.
"""
