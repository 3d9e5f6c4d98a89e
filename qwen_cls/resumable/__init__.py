"""Tools tier: resumable."""
