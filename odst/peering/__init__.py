"""Peering: registering sites with each other, signed peer requests, mirrors of peers' logs."""
