"""The lease client, in any Python process: ``kzpool.connect()`` and its leases."""
