"""fedser.tools."""
