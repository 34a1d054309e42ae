"""The local-cluster harness: processes under a supervisor (``kvr up``, ``kvr demo``, the
benchmarks and the fault suite) and the load generator that drives them. It starts the
router, workers and monitor as children; it is not part of any of them."""
