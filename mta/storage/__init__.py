"""mta.storage."""
