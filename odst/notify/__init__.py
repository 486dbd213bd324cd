"""Notifications: signed webhook deliveries and email digests of the site's events."""
