"""relayd: an outbound mail relay. The packages, in the order a message meets them:

``ingress`` (SMTP in, policy) -> ``queue.intake`` (the one door into the ``spool``) ->
``queue.scheduler`` (when and where) -> ``delivery`` (SMTP out) -> ``outcomes`` (what follows
an attempt) -> ``spool`` (one transaction) -> ``events`` (the log, the outbox). Below them:
``model`` (the vocabulary), ``mime`` (message text), ``config``, ``shaping`` (rates, rotation).
``process`` runs it all as two processes; ``ctl`` is relayctl.
"""
