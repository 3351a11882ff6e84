"""Stores: one small module per store and one command family per PostgreSQL client binary.

Driver exceptions become `RecoveryError`s here and nowhere else: postgres.py (asyncpg), s3.py
(aioboto3, aiohttp copier), qdrant.py (qdrant-client), advisory.py (a session advisory lock that
dies with its holder), failures.py (what escaped anyway, as one cause and fix), pgclient/ (pg_dump,
pg_restore, psql: argv and the one environment filter built by commands.py, run by process.py, the
binary chosen by versions.py). Nothing here knows Engram.
"""
