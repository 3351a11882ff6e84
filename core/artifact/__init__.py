"""What a stored artifact is made of, in both directions.

compression.py (zstd, gzip), encryption.py (the chunked AES-GCM format of docs/backup-format.md),
extract.py (an artifact back into a stock dump file, atomically).
"""
