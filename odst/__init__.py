"""ODST: an event-sourced, on-premise package distribution server for Mac admins."""

__version__ = "0.1.0"
