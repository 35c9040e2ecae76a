"""The back-end channel (BACKEND_REQ): a socket the front end gives us for
requests of our own; here, telling it the device's config changed (e.g. a
disk grew)."""

from __future__ import annotations

import os
import socket
import stat

import trio

from vfiouserd.changes import Changes, Watched
from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.log import get_logger
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError
from vfiouserd.protocol.vhost_user import Message, ProtocolFeature
from vfiouserd.trace import tracer
from vfiouserd.vhost_user.features import Features
from vfiouserd.vhost_user.messages import RequestFailed, trace_received, trace_sent

log = get_logger("vhost_user")


class BackendChannel:
    # A handover waits until no announcement waits for its reply.
    announcing = Watched[bool]()

    def __init__(self, device: VirtioDevice, features: Features, changes: Changes) -> None:
        self.device = device
        self.features = features
        self._changes = changes  # the back end's: what a handover's pause waits on
        self.socket: trio.socket.SocketType | None = None
        self.announcing = False
        self._config_wakeup = trio.Event()

    def listen(self) -> None:
        """Hear of config changes from now on."""
        self.device.add_config_listener(self._config_wakeup.set)

    def stop_listening(self) -> None:
        self.device.remove_config_listener(self._config_wakeup.set)

    def adopt(self, fd: int) -> None:
        self.socket = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def set_backend_req_fd(self, message: Message) -> None:
        # Checked before the fd changes hands: a socket object refuses a
        # file or a pipe, and the fd must then stay the message's to close.
        if not stat.S_ISSOCK(os.fstat(message.fds[-1]).st_mode):
            raise RequestFailed("the back-end channel fd is not a socket")
        fd = message.fds.pop()
        channel = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        if self.socket is not None:
            self.socket.close()
        self.socket = channel

    async def announce_config_changes(self) -> None:
        """Tell the front end when the device's config changed."""
        while True:
            await self._config_wakeup.wait()
            self.device.remove_config_listener(self._config_wakeup.set)
            self._config_wakeup = trio.Event()
            self.device.add_config_listener(self._config_wakeup.set)
            self.announcing = True  # a handover waits for the reply
            try:
                await self._send_config_change()
            finally:
                self.announcing = False

    async def _send_config_change(self) -> None:
        if not self.features.has_protocol(ProtocolFeature.CONFIG):
            # The front end keeps the config space itself (QEMU's virtio-net
            # does, and QEMU 7.2 crashes on a change message it has no
            # handler for): nothing to tell it.
            log.debug("config.change_not_announced", reason="CONFIG not negotiated")
            return
        channel = self.socket
        if channel is None:
            log.warning("config.change_not_announced", reason="no back-end channel")
            return
        need_reply = self.features.has_protocol(ProtocolFeature.REPLY_ACK)
        request = vu.BackendRequest.CONFIG_CHANGE_MSG
        try:
            data = vu.encode(request, need_reply=need_reply)
            if tracer.wants("message"):
                trace_sent(data, 0, backend_channel=True)
            await vu.write_message(channel, data)
            if need_reply:
                with trio.fail_after(5):
                    reply = await vu.read_message(channel)
                reply.close_fds()
                if tracer.wants("message"):
                    trace_received(reply, backend_channel=True)
                status = vu.U64.parse(reply.payload).value if len(reply.payload) == 8 else -1
                if reply.request != request or not reply.is_reply or status != 0:
                    log.warning("config.change_refused", request=reply.request, status=status)
                    return
        except (ConnectionClosed, FramingError, OSError, trio.TooSlowError) as exc:
            log.warning("backend_channel.failed", reason=str(exc) or type(exc).__name__)
            channel.close()
            self.socket = None
            return
        log.info("config.change_announced")
