"""Process management: worker processes sharing the listening sockets
(`workers`, `child`), balancing long-lived connections between them (`balance`),
and the lean threads and batches that take blocking work off the reactor
(`threads`, `batch`)."""
