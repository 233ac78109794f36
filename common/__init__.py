"""fedser.common."""
