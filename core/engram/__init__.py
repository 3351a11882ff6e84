"""What Engram itself defines, read from its source.

crypto.py (wrap formats, row AAD, content hashes), keys.py (Engram's key rules: the canary opens
with the current key only, DEKs with the current then the previous one; the one decoder of the
master keys), canary.py (the one read of system_canaries), schema_probe.py (what this database
has, detected at run time), oban.py (EmbedNote jobs and Oban's tables).
"""
