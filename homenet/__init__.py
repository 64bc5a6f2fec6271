"""HomeNet: every server of a home network through one port."""

__version__ = "0.1.0"
