"""Where recovery points live, and everything about their keys and records.

base.py (what every repository can do, and the local one), s3.py (an S3 bucket as a repository),
localfs.py (atomic files on a local disk), manifest.py (the document each backup stores),
catalog.py (which backups exist, what is known of each, what retention would do), verify.py and
verification.py (re-reading artifacts against their recorded digests, and keeping the result),
retention.py (the pure policy) and prune.py (applying it).
"""
