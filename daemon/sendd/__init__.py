"""sendd: bulk message send daemon."""
