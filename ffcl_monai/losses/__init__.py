"""Losses: one small module per loss, each citing its paper or equation."""
