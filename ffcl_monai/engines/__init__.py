"""Ignite engines: one module per training method."""
