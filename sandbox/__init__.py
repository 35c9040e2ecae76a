"""The jail (vfiouserd.sandbox): namespaces, capabilities and seccomp.

Empty for now: the daemon does not jail itself yet. It already opens every
file and socket a device needs before serving, which is the order the jail
will rely on.
"""
