"""data_prep: raw dataset layouts -> validated MONAI decathlon datalists (`python -m data_prep --help`)."""
