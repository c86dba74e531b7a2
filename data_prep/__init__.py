"""data_prep: raw dataset layouts -> validated MONAI decathlon datalists (`python -m data_prep --help`)."""

__version__ = "0.1.0"
