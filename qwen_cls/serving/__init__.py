"""Tools tier: serving."""
