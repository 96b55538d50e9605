"""mta.policy."""
