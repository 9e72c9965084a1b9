"""passthrough: methods are registered here."""
