"""Tools tier: commands."""
