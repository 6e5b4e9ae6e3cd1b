"""The spool: one SQLite file, the single source of truth. Every SQL statement of relayd is in
this package: the schema (``schema``), the one writer thread with group commit (``writer``),
the daemon's operations (``store``) and relayctl's (``admin``)."""
