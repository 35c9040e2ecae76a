"""Configuration files: one TOML file per device, for units and scripts.

A file names the subcommand and its options; it stands for the command
line it expands to, so both are documented by ``vfiouserd COMMAND --help``::

    command = "vhost-user-blk"
    socket-path = "/run/vfiouserd/disk0/vhost-user.sock"
    blk-file = "/var/lib/vfiouserd/disk0.img"
    read-only = true        # a flag: true adds it, false leaves it out
    num-queues = 2
"""

from __future__ import annotations

import tomllib
from pathlib import Path


class ConfigError(Exception):
    pass


def arguments_from_file(path: str) -> list[str]:
    """The command line a configuration file stands for."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    command = table.pop("command", None)
    if not isinstance(command, str):
        raise ConfigError(f"{path}: 'command' (the subcommand, e.g. \"vhost-user-blk\") is missing")
    argv = [command]
    for key, value in table.items():
        option = f"--{key}"
        if isinstance(value, bool):
            if value:
                argv.append(option)
        elif isinstance(value, int | float | str):
            argv += [option, str(value)]
        else:
            raise ConfigError(f"{Path(path).name}: {key} must be a string, number or boolean")
    return argv
