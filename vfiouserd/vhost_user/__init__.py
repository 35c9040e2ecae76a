"""The vhost-user back end: one session per front-end connection."""
