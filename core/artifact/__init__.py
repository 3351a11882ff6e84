"""What a stored artifact is made of, in both directions.

compression.py (zstd, gzip), encryption.py (the chunked AES-GCM format of docs/backup-format.md, and
the one decoder of the backup key), codec.py (Encoder and Decoder: the two directions of one
layering), extract.py (an artifact back into a stock dump file, atomically).
"""
