"""mta.admin."""
