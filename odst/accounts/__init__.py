"""Who may use the Admin API and the web UI: local users, LDAP sign-in, sessions."""
