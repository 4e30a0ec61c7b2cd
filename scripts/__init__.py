"""cosmofm: a self-supervised foundation model for astronomical data."""
