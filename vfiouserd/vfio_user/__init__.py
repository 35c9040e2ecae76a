"""The vfio-user server: one session per client connection to one PCI device."""
