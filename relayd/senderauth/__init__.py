"""Sender authentication: whether receivers will find a sending domain's SPF, DKIM, DMARC,
reverse DNS, MTA-STS and TLS-RPT records right for the mail relayd sends (relayctl
check-domain, GET /v1/domains/{domain}/check)."""
