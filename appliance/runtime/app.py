"""Assemble the appliance from a validated config and run its one event loop."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from appliance import fastpath
from appliance.config import Config
from appliance.control.events import MIGRATION_STATE
from appliance.control.guest_faults import GuestFaults
from appliance.errors import ApplianceError
from appliance.memory import ClientMemory
from appliance.runtime import startup
from appliance.runtime.doorbell_spin import DoorbellSpin
from appliance.runtime.handoff.manifest import (
    HANDOFF_VERSION,
    ControlState,
    DoorbellPageState,
    Manifest,
)
from appliance.runtime.handoff.sink import HandoffSink
from appliance.runtime.handoff.source import HandoffSource
from appliance.runtime.listener import Claim, ListenerError
from appliance.runtime.loop import EventLoop
from appliance.runtime.migration_channel import ChannelEnds
from appliance.runtime.offload import Offload
from appliance.runtime.vfio_user import VfioUserClientSocket, VfioUserService
from appliance.storage.controller import NvmeController
from appliance.storage.doorbells import DoorbellPage
from appliance.storage.migration import NvmeMigratable
from appliance.storage.migration_channel import NvmeChannelDevice
from appliance.storage.nsmgmt import NamespaceManagement
from appliance.vfio_user.migration import VfioUserMigration
from appliance.vfio_user.migration_states import MigState

log = logging.getLogger("appliance")


class Appliance:
    """The process: devices, their sockets, and the loop that serves them."""

    def __init__(self, cfg: Config, standby: bool = False) -> None:
        """``standby``: a handoff destination for a source that holds what
        cannot be opened twice (the TAP interface): net ports neither listen
        nor connect and the TAP is not attached until a handoff brings the
        source's (docs/handoff.md)."""
        self.cfg = cfg
        self.standby = standby
        self.loop = EventLoop()
        self.services: list[Any] = []
        self.controller: NvmeController | None = None
        self.offload: Offload | None = None
        self.net: Any = None
        self._adopted: VfioUserClientSocket | None = None

    @property
    def net_enabled(self) -> bool:
        return self.net is not None

    def start(self) -> None:
        """Check every path, then create data and run dirs, images and sockets;
        register with the loop.  What a failed start created is closed (sockets)
        or removed (images it created, still empty) again.

        Raises:
            StartupError: one line starting with the config key of what failed.
            ApplianceError: the same from a service (net ports, the TAP).
        """
        startup.check(self.cfg, standby=self.standby)  # nothing exists yet
        new_images = startup.missing_images(self.cfg)
        try:
            try:
                self._start()
            except (OSError, ListenerError) as exc:
                raise startup.keyed(self.cfg, exc) from None
        except BaseException:
            self.close()
            startup.remove_new_images(new_images)
            raise

    def _start(self) -> None:
        cfg = self.cfg
        exports = startup.connect_exports(cfg)  # NBD-backed namespaces, before creating anything
        st = cfg.storage
        try:
            startup.make_dirs(cfg)
            self.controller = NvmeController(
                namespaces=st.namespaces, io_queues=st.io_queues,
                queue_entries=st.queue_entries, serial=st.serial, clock=time.monotonic,
                doorbells=st.doorbells, exports=exports, management=NamespaceManagement(
                    capacity=st.capacity or 0, max_namespaces=st.max_namespaces,
                    image_dir=cfg.data_dir, remove_images=st.namespace_images == "remove"))
        except BaseException:
            for export in exports.values():
                export.close()
            raise
        for nsid, export in exports.items():
            if export.read_only and not st.namespaces[nsid - 1].read_only:
                log.warning("storage.namespaces[%d]: the export is read-only: served read-only",
                            nsid - 1)
        self.offload = Offload(self.loop)  # the namespaces' blocking I/O runs off the loop
        self.controller.offload = self.offload
        self.controller.native = fastpath.nvme(self.cfg)  # the I/O queues' C path, or None
        # Migration v2 (commands 16-18): the controller's save/restore is
        # appliance.storage.migration; the vfio-user handler drives it.
        migratable = NvmeMigratable(self.controller, clock=time.monotonic)
        # The optional data channel (APPLIANCE_MIG_CHANNEL): its ends live on this loop.
        channels = ChannelEnds(self.loop, NvmeChannelDevice(migratable),
                               os.path.dirname(os.path.abspath(st.socket)))

        def migration_handler(memory: ClientMemory) -> VfioUserMigration:
            handler = VfioUserMigration(migratable, memory, name="nvme", channels=channels)

            def changed(old: MigState, new: MigState) -> None:  # (the control socket exists by now)
                self.control.emit(MIGRATION_STATE, {"device": "nvme", "from": old.name,
                                                    "to": new.name})

            handler.on_state = changed
            return handler

        self.migratable = migratable
        service = VfioUserService(self.loop, st.socket, self.controller, name="nvme",
                                  dma_layout=st.dma_layout,
                                  max_backlog=st.max_backlog, migration=migration_handler)
        self.services.append(service)
        self.vfio_user = service
        if self.controller.doorbell_page is not None:  # spin a while after activity
            self.doorbell_spin: DoorbellSpin | None = DoorbellSpin(self.controller)
            self.loop.add_idle(self.doorbell_spin.poll)
            self._poll_doorbell_page(self.controller, self.doorbell_spin)
        else:
            self.doorbell_spin = None
            self.loop.add_idle(self.controller.poll)
        self.loop.add_idle(service.flush_pending)  # after the poll: what it queued goes out
        self.net = self._start_net()
        from appliance.runtime.control import ControlService  # the control socket (ctl)

        self.control = ControlService(self.loop, cfg.control.socket,
                                      controller=self.controller, net=self.net,
                                      idle_timeout=cfg.control.idle_timeout)
        self.services.append(self.control)
        if st.guest_faults:  # the guest arms rules of the same set (OCP Error Injection)
            self.controller.guest_faults = GuestFaults(self.control.faults)
        service.emit = self.control.emit  # clients coming and going are QMP events
        for port_service in self.net.services if self.net is not None else []:
            port_service.emit = self.control.emit
        self.control.target.handoff_source = HandoffSource(self)
        self.control.target.handoff_sink = HandoffSink(self)
        self.control.target.migration_state = self._migration_state
        self.loop.install_signal_handlers()

    def _migration_state(self) -> str | None:
        """The connected vfio-user client's migration state name (``status``)."""
        client = self.vfio_user.client
        mig = client.conn.migration if client is not None else None
        state = getattr(mig, "state", None)  # VfioUserMigration's MigState
        return state.name if state is not None else None

    def _poll_doorbell_page(self, ctrl: NvmeController, spin: DoorbellSpin) -> None:
        """storage.doorbells: mmap: nothing wakes the loop when the guest rings a
        doorbell: the loop spins a while after activity (``spin``), and past that a
        timer polls the page at the period the controller asks for."""

        def tick() -> None:
            try:
                spin.poll()
            finally:
                self.loop.call_later(ctrl.poll_interval(), tick)

        self.loop.call_later(ctrl.poll_interval(), tick)

    def _start_net(self) -> Any:
        try:
            from appliance.runtime.vhost_user import NetService
        except ImportError:
            return None
        net = self.cfg.net
        if not net.ports and not net.tap.name:
            return None
        return NetService(self.loop, net, standby=self.standby, native=fastpath.walker(self.cfg))

    def net_ports(self) -> list[str]:
        return [p.socket for p in self.cfg.net.ports] if self.net is not None else []

    # ------------------------------------------------------------ live handoff
    # (appliance.runtime.handoff.source and .sink drive these, in the order below)
    def handoff_blocker(self) -> str:
        """Why the devices cannot move now ("" when they can)."""
        faults = self.control.faults
        if faults.deferred or faults.frames:
            return "fault injection holds completions or frames; clear the faults first"
        if self.controller is not None and self.controller.waiting:
            return "NVMe commands wait for I/O or DMA messages"
        if self.controller is not None and any(ns.remote for ns in
                                               self.controller.namespaces.values()):
            return "a namespace is on an NBD export (use appliance migrate --shared-storage)"
        busy = self.vfio_user.handoff_blocker()
        if not busy and self.net is not None:
            busy = self.net.handoff_blocker()
        return busy

    def handoff_quiesce(self) -> None:
        self.vfio_user.handoff_quiesce()
        self.migratable.migration_stop()
        if self.net is not None:
            self.net.handoff_quiesce()

    def handoff_export(self, fds: list[int]) -> Manifest:
        """Source, quiesced: the manifest of every device; each fd is appended to
        ``fds`` (still ours) and named by its index there.  Its ``version`` and
        ``fds`` (how many) are set here, so the manifest is complete."""
        assert self.controller is not None
        vfio_user = self.vfio_user.handoff_export(fds)
        page = self.controller.doorbell_page
        doorbell_page = None
        if page is not None:
            fds.append(page.fd)
            doorbell_page = DoorbellPageState(len(fds) - 1, bytes(page.seen))
        net = self.net.handoff_export(fds) if self.net is not None else None
        control = ControlState(self.control.faults.export_state(),
                               tuple(sorted(self.control.target.links_down)))
        return Manifest(HANDOFF_VERSION, len(fds), vfio_user, doorbell_page, net, control)

    def handoff_resume(self) -> None:
        if self.net is not None:
            self.net.handoff_resume()
        self.migratable.migration_run()
        self.vfio_user.handoff_resume()

    def handoff_release(self) -> None:
        """Let go of every handed-over fd silently (both ends use it: the source
        after ``go``, the destination when it must not serve what it adopted)."""
        self.vfio_user.handoff_release()
        if self.net is not None:
            self.net.handoff_release()

    def handoff_not_idle(self) -> str:
        if self.vfio_user.client is not None:
            return "a vfio-user client is connected"
        if self.net is not None and any(svc.session is not None for svc in self.net.services):
            return "a vhost-user front-end is connected"
        return ""

    def handoff_check(self, manifest: Manifest, fds: list[int]) -> None:
        """Destination: everything :meth:`handoff_adopt` would refuse, refused now
        (the manifest's fields were checked by :meth:`Manifest.from_json`; here,
        whether it fits this process and what each fd is).

        Raises:
            ApplianceError: one line naming what does not fit.
        """
        assert self.controller is not None
        self.migratable.check_staged()  # the device state is complete and consistent
        page = manifest.doorbell_page
        if (page is None) != (self.controller.doorbell_page is None):
            raise ApplianceError("storage.doorbells differs between the two processes")
        if page is not None:
            try:
                DoorbellPage.check_take_over(fds[page.fd], page.seen)
            except (OSError, ValueError) as exc:
                raise ApplianceError(f"handoff manifest: doorbell_page: {exc}") from None
        self.vfio_user.handoff_check(manifest.vfio_user, fds)
        if (manifest.net is None) != (self.net is None):
            raise ApplianceError("net configuration differs: one side has no net ports")
        if self.net is not None and manifest.net is not None:
            self.net.handoff_check(manifest.net, fds)
        control = manifest.control
        if control is not None:
            ports = {svc.port.name for svc in self.net.services} if self.net is not None else set()
            if not all(name in ports for name in control.links_down):
                raise ApplianceError(f"handoff manifest: links_down {list(control.links_down)!r} "
                                     "names no port here")

    def handoff_adopt(self, manifest: Manifest, fds: list[int]) -> None:
        assert self.controller is not None
        self.migratable.migration_stop()
        self._adopted = self.vfio_user.handoff_adopt(manifest.vfio_user, fds)
        self.migratable.commit_restore()
        control = manifest.control
        if control is not None:  # the injected faults and link states go on here
            self.control.faults.import_state(control.faults, self.controller)
            self.control.target.links_down = set(control.links_down)
        page = manifest.doorbell_page
        if page is not None:
            self.controller.take_over_doorbell_page(fds[page.fd], page.seen)
        if self.net is not None and manifest.net is not None:
            self.net.handoff_import(manifest.net, fds, serve=False)  # until go

    def handoff_start(self) -> None:
        """Serve what was adopted: commands queued meanwhile, then whatever comes."""
        for claim in self._claims():  # the socket paths are this process's now
            claim.write_pid()
        self.migratable.migration_run()
        if self.net is not None:
            self.net.handoff_start()
        self.vfio_user.handoff_resume()  # its listener and client, read from now on
        client, self._adopted = self._adopted, None
        if client is not None and not client.conn.closed:
            client.conn.process()
            client.flush()

    def _claims(self) -> list[Claim]:
        """The locks of the listeners a handoff moves (not the control socket's)."""
        claims = [self.vfio_user.claim]
        if self.net is not None:
            claims += [svc.claim for svc in self.net.services if svc.claim is not None]
        return claims

    def run(self) -> None:
        self.loop.run()

    def close(self) -> None:
        for service in self.services:
            service.close()
        if self.net is not None:
            self.net.close()
        if self.controller is not None:
            self.controller.close()
        if self.offload is not None:
            self.offload.close()
        self.loop.close()
