"""The vocabulary every other package speaks: messages, recipients, states, ids, addresses,
status codes. Plain data and pure functions: nothing here does I/O or reads a clock it is not
given."""
