"""The jail (vfiouserd.sandbox): namespaces, capabilities and seccomp
(``jail``, ``namespaces``, ``seccomp``), and the small program the daemon's
parent becomes outside it (``waiter.c``, built with the package).
"""
