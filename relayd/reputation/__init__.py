"""The blacklist watch: every source address of the pools looked up on the configured DNS
blacklists on a schedule (``lookup``: one question and what its answer means; ``watch``: the
rounds, their record in the spool, and which sources the scheduler may use meanwhile)."""
