"""plan_restore and restore_drill.

plan_restore gathers (observe.py, I/O only) and judges (plan.py, steps.py, token.py: pure).
restore_drill: drill.py (the scratch database, the restore with stock tools, the proofs).
"""
