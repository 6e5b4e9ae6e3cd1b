"""The queue process's core: ``intake`` (the one door into the spool), ``scheduler`` (when and
where each job goes), ``control`` (relayctl's actions, the spool's housekeeping)."""
