"""systemd units, the configuration example and vhost-user descriptors, shipped as package data."""
