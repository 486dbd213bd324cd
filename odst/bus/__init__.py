"""The message bus: the embedded nats-server and connections to NATS."""
