"""Tools tier: chain."""
