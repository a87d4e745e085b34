"""The master process: forks and supervises the workers, places leases, keeps the tables."""
