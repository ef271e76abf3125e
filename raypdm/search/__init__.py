"""Noise-token and guidance search on Ray Tune (`raypdm sweep`)."""
