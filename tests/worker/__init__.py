"""worker tier."""
