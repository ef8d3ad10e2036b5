"""Running a study: the driver, data checks, storage, devices, worker processes or Ray actors, and faults."""
