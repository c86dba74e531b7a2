"""One module per supported raw layout. Each exposes ``add_parser(subparsers)`` and ``scan(args) -> Scan``."""
