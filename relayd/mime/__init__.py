"""Message text: header sections, trace headers, DKIM signatures, DSN reports."""
