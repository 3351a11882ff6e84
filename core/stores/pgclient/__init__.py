"""PostgreSQL's client binaries: process.py runs them (argv, filtered environment, stderr tail),
versions.py chooses which installation's binary fits a server or a dump."""
