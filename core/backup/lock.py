"""One backup at a time, with locks that die with their holder.

Two locks, both released by the operating system or the database when the
holder dies (a killed process leaves no stale lock file to clean by hand):

* a PostgreSQL session advisory lock on the Engram database (stores/advisory.py, with
  the purpose below): two cron entries, an assistant and a human, on any machines,
  backing up the same database;
* the repository's own lock (`Repository.lock`; for a local directory, `flock` on
  `<repository>/.lock`): two deployments writing (and pruning) the same directory.
"""

from __future__ import annotations

from ..stores.advisory import Purpose, advisory_key

BACKUP = Purpose(
    advisory_key("backup"),
    "engram-recovery run_backup",
    "another backup of this database is running",
    "wait for the running backup to finish (backup_status shows the newest one), or stagger the cron "
    "entries; the lock is released automatically when its holder ends, even if it is killed",
)
