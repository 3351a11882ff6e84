"""plan_restore, restore_drill and the decrypt command.

plan_restore: planner.py (the run) gathers (observe.py, I/O only) and judges (plan.py, steps.py,
token.py: pure). restore_drill: drill_run.py (the run, its steps and its record), drill.py (the
scratch database, the restore with stock tools, the proofs). decrypt.py: a recovery point's dump
back into the stock file pg_dump wrote.
"""
