"""Jamf Pro integration: the API client, distribution point and package records, drift checks."""
