"""Interrupts of a vfio-user server connection: SET_IRQS and the eventfds it
hands over (qemu/qemu docs/interop/vfio-user.rst, VFIO_USER_DEVICE_SET_IRQS).

:class:`ServerIrqs` is a part of
:class:`~appliance.vfio_user.server.ServerConnection` (its base class), kept
apart because it is a concern of its own: which sub-indexes of each irq index
the client enabled, the eventfd that triggers each one, the eventfds that
announce a mask or unmask, and the device's view of them
(:meth:`~appliance.vfio_user.backend.VfioUserDevice.set_irq_count`).  The
connection owns every eventfd it keeps and closes the one a later request
replaces.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from appliance.protocol_common import close_quietly, require
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.framing import Frame
from appliance.vfio_user.request_payload import fits, request_struct


class ServerIrqs:
    """The interrupt methods of :class:`~appliance.vfio_user.server.ServerConnection`."""

    # Set by ServerConnection.__init__.
    device: VfioUserDevice
    notify: Callable[[int], None]
    is_eventfd: Callable[[int], bool] | None
    irq_fds: dict[tuple[int, int], int]
    irq_mask_fds: dict[tuple[int, int, int], int]
    irq_enabled: dict[int, int]

    def _set_irqs(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.IrqSet)
        data = frame.payload[w.IrqSet.SIZE:]
        # Here argsz is the request's own size ("the size of the VFIO IRQ set request
        # payload, including any data field"), so it must agree with the message.
        require(req.argsz == len(frame.payload), errno.EINVAL,
                f"SET_IRQS argsz {req.argsz} != payload {len(frame.payload)}")
        require(not req.flags & w.IRQ_SET_FLAGS_RESERVED, errno.EINVAL,
                f"SET_IRQS flags {req.flags:#x}")
        dflag = req.flags & w.IRQ_SET_DATA_MASK
        action = req.flags & w.IRQ_SET_ACTION_MASK
        require(dflag.bit_count() == 1 and action.bit_count() == 1, errno.EINVAL,
                f"SET_IRQS needs one data and one action flag, got {req.flags:#x}")
        require(req.index < w.PCI_NUM_IRQS, errno.EINVAL, f"irq index {req.index}")
        total = self.device.irq(req.index).count
        disable_all = dflag == w.IrqSetFlag.DATA_NONE and req.count == 0 and req.start == 0
        require(disable_all or (req.count > 0 and fits(req.start, req.count, total)), errno.EINVAL,
                f"irq range {req.start}+{req.count} of {total}")
        fds = frame.fds
        require(dflag == w.IrqSetFlag.DATA_EVENTFD or not fds, errno.EINVAL,
                "fds without DATA_EVENTFD")
        if self.is_eventfd is not None:
            for fd in fds:
                require(self.is_eventfd(fd), errno.EINVAL, f"SET_IRQS fd {fd} is not an eventfd")
        if dflag == w.IrqSetFlag.DATA_BOOL:
            require(len(data) == req.count, errno.EINVAL, "SET_IRQS bool data size")
            selected = [i for i in range(req.count) if data[i]]
        else:
            # Data after a NONE/EVENTFD request is ignored, as libvfio-user ignores it.
            selected = list(range(req.count))

        if disable_all:
            if action == w.IrqSetFlag.ACTION_TRIGGER:
                self.irq_enabled[req.index] = 0
                self._set_irq_fds(req.index, 0, total, [])
            return b""
        if dflag == w.IrqSetFlag.DATA_EVENTFD:
            require(len(fds) in (0, req.count), errno.EINVAL,
                    f"SET_IRQS {len(fds)} fds for {req.count} irqs")
            if action == w.IrqSetFlag.ACTION_TRIGGER:
                # A trigger enables the sub-indexes even without fds: QEMU enables
                # MSI-X with {start 0, count 1, no fd} before any vector is unmasked.
                enabled = max(self.irq_enabled.get(req.index, 0), req.start + req.count)
                self.irq_enabled[req.index] = enabled
                self._set_irq_fds(req.index, req.start, req.count, fds)
            else:
                kind = int(action)
                for i in range(req.count):
                    old = self.irq_mask_fds.pop((kind, req.index, req.start + i), None)
                    if old is not None:
                        close_quietly(old)
                    if fds:
                        self.irq_mask_fds[(kind, req.index, req.start + i)] = fds[i]
            frame.fds = []  # ownership moved
            return b""
        subs = [req.start + i for i in selected]
        if action == w.IrqSetFlag.ACTION_TRIGGER:
            for sub in subs:
                self._signal_irq(req.index, sub)
        else:
            masked = action == w.IrqSetFlag.ACTION_MASK
            for sub in subs:
                self.device.irq_mask(req.index, sub, 1, masked)
                notice = self.irq_mask_fds.get((int(action), req.index, sub))
                if notice is not None:
                    self.notify(notice)
        return b""

    def _set_irq_fds(self, index: int, start: int, count: int, fds: list[int]) -> None:
        for i in range(count):
            old = self.irq_fds.pop((index, start + i), None)
            if old is not None:
                close_quietly(old)
            if fds:
                self.irq_fds[(index, start + i)] = fds[i]
        self.device.set_irq_count(index, self.irq_enabled.get(index, 0))
        self.device.irqs_configured(index)

    def _signal_irq(self, index: int, sub: int) -> bool:
        fd = self.irq_fds.get((index, sub))
        if fd is None:
            return False
        self.notify(fd)
        return True

    def _irq_eventfd(self, index: int, sub: int) -> int | None:
        return self.irq_fds.get((index, sub))

    def irq_count(self, index: int) -> int:
        """How many eventfds the client set for irq ``index``."""
        return sum(1 for (i, _) in self.irq_fds if i == index)
