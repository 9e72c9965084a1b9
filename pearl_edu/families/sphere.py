"""sphere: methods are registered here."""
