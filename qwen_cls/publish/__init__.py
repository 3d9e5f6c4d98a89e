"""Tools tier: publish."""
