"""plan_restore, run_restore, restore_drill and the decrypt command.

run_restore: run.py (the use case: the token's premises re-checked, the step log, resume) and
run_steps.py (the steps in Engram's order, each saying what it changed).

plan_restore: planner.py (the run) gathers (observe.py, I/O only) and judges (plan.py, steps.py,
token.py: pure). restore_drill: drill_run.py (the run, its steps and its record), drill.py (the
scratch database, the restore with stock tools, the proofs). decrypt.py: a recovery point's dump
back into the stock file pg_dump wrote.

The engines run_restore (issue 13) and the drill will share: database.py restores a backup's dump into
an empty database with stock pg_restore (rows loading while the artifact decrypts, post-data with
--jobs; feed.py runs the clients on one decrypted stream) and schema_check.py proves every table,
constraint, index and row count came back; copy_back.py puts a backup's attachments back into a bucket,
each blob checked against its recorded checksum, resumable.
"""
