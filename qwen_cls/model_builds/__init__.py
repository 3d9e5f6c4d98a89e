"""Tools tier: model builds."""
