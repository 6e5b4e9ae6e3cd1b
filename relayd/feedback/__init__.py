"""What comes back after delivery: asynchronous bounces, complaints and unsubscribes."""
