"""The two processes (queue and ingress), the hand-off between them, and systemd's protocol."""
