"""An NVMe controller (PCIe, NVMe base specification 1.4) on raw image files:
``vfiouserd vfio-user-nvme --namespace FILE[,ro] ...``, each namespace (NSID
1, 2, ... in order) an image of 512-byte logical blocks.

Offered: the admin commands a Linux driver and nvme-cli use, Read, Write,
Flush, Write Zeroes and Dataset Management with PRPs or SGLs (data blocks,
segments, bit buckets), asynchronous events, shadow doorbells (Doorbell
Buffer Config), controller reset, shutdown and function-level reset, state
for migration and restarts. Not offered: keyed or metadata SGLs, NVM
subsystem reset, metadata and protection information, namespace
management, firmware download.

A module a concern:
- ``formats``: the NVMe formats, bytes only (registers, queue entries,
  Identify pages, log pages, opcodes, status codes), shared with the
  project's NVMe driver (vfiouserd/client/nvme.py);
- ``controller``: the PCI function: identity, BAR0 registers, enable,
  disable, shutdown and resets, the task serving the queues, running one
  command, state;
- ``queues``: submission and completion queues, doorbells, the round that
  takes commands from them, posting completions (phase tag, a full CQ);
- ``events``: Asynchronous Event Requests and the events they report;
- ``admin``: the admin commands, features and logs;
- ``errors``: the Error Information log of the commands that failed;
- ``io``: namespaces and the NVM I/O commands;
- ``prp``: the guest memory a command's PRP entries or SGL describe;
- ``native``: the native loop (``fastpath.c``) serving the I/O queues.
"""

from vfiouserd.devices.nvme.controller import NvmeController

__all__ = ["NvmeController"]
