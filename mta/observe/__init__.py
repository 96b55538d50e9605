"""mta.observe."""
