"""mta.delivery."""
