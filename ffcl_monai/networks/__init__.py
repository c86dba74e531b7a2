"""Backbones, their blocks and classifier heads."""
