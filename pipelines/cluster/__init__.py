"""Scale-out: the fan-out over the work pool, job entry points, S3 storage and run mirrors."""
