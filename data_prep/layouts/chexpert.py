"""Placeholder."""


def add_parser(sub, common):
    """Not implemented yet."""
