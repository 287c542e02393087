"""Assemble the appliance from a validated config and run its one event loop."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from appliance.loop import EventLoop
from appliance.memory import ClientMemory
from appliance.migrate.nvme_state import NvmeMigratable
from appliance.runtime.vfio_user import VfioUserService
from appliance.storage.controller import NvmeController
from appliance.vfio_user.migration import VfioUserMigration
from appliance.vfio_user.server import DmaLayout

log = logging.getLogger("appliance")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


class Appliance:
    """The process: devices, their sockets, and the loop that serves them."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.loop = EventLoop()
        self.services: list[Any] = []
        self.controller: NvmeController | None = None
        self.net: Any = None

    @property
    def net_enabled(self) -> bool:
        return self.net is not None

    def start(self) -> None:
        """Create data and run dirs, images and sockets; register with the loop."""
        cfg = self.cfg
        _private_dir(cfg["run_dir"])
        _private_dir(cfg["data_dir"])
        st = cfg["storage"]
        for ns in st["namespaces"]:
            os.makedirs(os.path.dirname(os.path.abspath(ns["image"])), exist_ok=True)
        for path in [st["socket"], cfg["control"]["socket"], *(p["socket"] for p in cfg["net"]["ports"])]:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.controller = NvmeController(
            namespaces=st["namespaces"], io_queues=st["io_queues"],
            queue_entries=st["queue_entries"], serial=st["serial"], clock=time.monotonic,
            doorbells=st["doorbells"])
        # Migration v2 (commands 16-18): the device's save/restore lives in
        # appliance.migrate, so storage/ never imports it.
        migratable = NvmeMigratable(self.controller, clock=time.monotonic)

        def migration_handler(memory: ClientMemory) -> VfioUserMigration:
            return VfioUserMigration(migratable, memory, name="nvme")

        self.controller.migration_handler = migration_handler  # type: ignore[attr-defined]
        service = VfioUserService(self.loop, st["socket"], self.controller, name="nvme",
                                  dma_layout=DmaLayout(st["dma_layout"]))
        self.services.append(service)
        self.loop.add_idle(self.controller.poll)
        if self.controller.doorbell_page is not None:
            self._poll_doorbell_page(self.controller)
        self.net = self._start_net()
        from appliance.runtime.control import ControlService  # the control socket (ctl)

        self.control = ControlService(self.loop, cfg["control"]["socket"],
                                      controller=self.controller, net=self.net)
        self.services.append(self.control)
        self.loop.install_signal_handlers()

    def _poll_doorbell_page(self, ctrl: NvmeController) -> None:
        """storage.doorbells: mmap: nothing wakes the loop when the guest rings a
        doorbell, so a timer polls the page at the period the controller asks for."""

        def tick() -> None:
            try:
                ctrl.poll()
            finally:
                self.loop.call_later(ctrl.poll_interval(), tick)

        self.loop.call_later(ctrl.poll_interval(), tick)

    def _start_net(self) -> Any:
        try:
            from appliance.runtime.vhost_user import NetService
        except ImportError:
            return None
        if not self.cfg["net"]["ports"] and not self.cfg["net"]["tap"]["name"]:
            return None
        return NetService(self.loop, self.cfg["net"])

    def net_ports(self) -> list[str]:
        return [p["socket"] for p in self.cfg["net"]["ports"]] if self.net is not None else []

    def run(self) -> None:
        self.loop.run()

    def close(self) -> None:
        for service in self.services:
            service.close()
        if self.net is not None:
            self.net.close()
        if self.controller is not None:
            self.controller.close()
        self.loop.close()
