"""The project's own VMM side: a vhost-user front end and a simulated guest
(shared RAM, driver-side rings, blk/rng requests) for tests, benchmarks and
tools."""
