"""Authentication shared by the daemon and `mta-admin` (no reactor here)."""
