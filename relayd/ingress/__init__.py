"""Ingress: the doors mail comes in by (SMTP today), with their policy, logins and TLS. It
decides accept or reject and hands what it accepts to the queue process; it never delivers."""
