"""PostgreSQL's client binaries: commands.py builds them (one family: argv with the client prefix, one
environment filter), process.py runs them (stdout read, stdin fed, or to the end; stderr's tail in our
error), versions.py chooses which installation's binary fits a server or a dump."""
