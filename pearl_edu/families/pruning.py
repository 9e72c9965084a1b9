"""pruning: methods are registered here."""
