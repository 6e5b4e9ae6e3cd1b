"""What relayd tells senders about their mail: signed webhooks fed from the event log."""
