"""The supervisor core: a fleet of sandboxes in a trio nursery."""
