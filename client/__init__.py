"""fedser.client."""
