"""History-informed sampling."""
