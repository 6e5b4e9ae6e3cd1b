"""Events as data: typed records (``records``), kept in the spool's outbox table in the
transaction of the change they report, and rendered as the JSON log lines (``log``)."""
