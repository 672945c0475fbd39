"""Small explicit state, each object passed to the actors that use it (see each module)."""
