"""Serving a published folder over HTTP. No Flower."""
