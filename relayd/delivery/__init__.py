"""Delivery: the outbound SMTP client and the DNS that routes it (MX, addresses, literals)."""
