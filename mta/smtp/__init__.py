"""mta.smtp."""
