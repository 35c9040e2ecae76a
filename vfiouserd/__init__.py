"""vfiouserd: out-of-process device emulation over vhost-user and vfio-user."""

__version__ = "0.1.0"
