"""Clients of systemd's own protocols: sd_notify (notify.py) and the journal's native one (journal.py)."""
