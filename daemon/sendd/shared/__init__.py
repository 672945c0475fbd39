"""Limits shared by a fleet of daemons through Redis."""
