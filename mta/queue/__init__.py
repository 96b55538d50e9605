"""mta.queue."""
