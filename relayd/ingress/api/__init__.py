"""The HTTP sending API: requests in (schema), messages out (compose), served by server."""
