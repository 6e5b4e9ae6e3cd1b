"""What follows a delivery attempt: decisions as values (``decide``: delivered, deferred until
T, bounced, expired, DSN owed), and the one transaction that commits them with the DSNs and
events they imply (``commit``). This is the one way out of an attempt."""
