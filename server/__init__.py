"""fedser.server."""
