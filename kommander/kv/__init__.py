"""The replicated key-value service: the example application users copy."""
