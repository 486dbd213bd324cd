"""A real OpenLDAP (slapd) on 127.0.0.1 for the LDAP sign-in tests (fixture: ``slapd``)."""
