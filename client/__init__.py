"""headrace client SDK."""
