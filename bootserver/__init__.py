"""bootserver: a PXE/netboot boot server that takes machines from power-on to running services."""

__version__ = "0.1.0"
