"""relayctl, the operator's command line: the queue, logins, certificates, DKIM keys."""
