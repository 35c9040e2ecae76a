"""vfiouserd's own stateful fuzzer: hostile VMMs and guests against the real daemon.

``python -m fuzz.run --device vhost-user-blk --duration 600 --seed 1`` runs
deterministic cases (seed and case index fix every byte sent) against a
daemon started as a subprocess, jailed as in production, and checks after
every case that it still serves, leaks no fd, keeps its memory bounded and
logged no crash. ``fuzz.harness`` holds the daemon and the checks, the
``*_cases`` modules what a case sends.
"""
