"""Fault injection: matching armed rules and what their firings leave behind
(device layer, no I/O, no clock).

Theory of operation
-------------------
A :class:`~appliance.control.fault_rules.FaultRule` (its fields and how one
is built: :mod:`appliance.control.fault_rules`) says *what* to break
(``action``), *when* (``count``: how many more times it may fire, 0 =
unlimited; ``probability`` drawn from the set's seeded RNG so a run is
reproducible) and *which* traffic it matches (NVMe: queue id, opcode, LBA
range, NSID; net: port name and direction).  :class:`FaultSet` holds the rules of one process, counts every
firing per rule and keeps the two pieces of state a fault leaves behind:

* NVMe: *hung* requests (never completed unless aborted; a controller reset
  drops them with their queue) and *deferred* ones (executed now, completed
  when the runtime clock passes their due time).  The set is the
  controller's fault hook: :meth:`FaultSet.submit` stands between a fetched
  :class:`~appliance.storage.request.NvmeRequest` and the controller's public
  ``execute``, and holds requests with the controller's ``hold`` (so the
  controller's Abort finds them); :meth:`FaultSet.release` is called from the
  controller's processing pass and completes the deferred requests that are
  due through the controller's ``complete``.
* net: delayed and reordered frames, released by :meth:`FaultSet.due_frames`.

Time comes from the ``clock`` the runtime passes in (seconds); this module
never sleeps.  Faults act on completions, submission entries and frames,
never on the image: an injected error status does not execute the command, a
delayed command runs at once (its data is on the image) and only its
completion waits, an ``edit`` rewrites the request's entry (not its CID) and
the controller runs what it then says.  Rules the guest armed (OCP Error
Injection, :mod:`appliance.control.guest_faults`) carry their ``guest_type``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.control.fault_rules import (
    U64,
    Direction,
    FaultError,
    FaultRule,
    FaultTarget,
    NetAction,
    NvmeAction,
    checked_int,
)
from appliance.storage.protection import PiFault
from appliance.storage.request import NvmeRequest, RequestState, Result
from appliance.storage.spec import Command, IoOpcode

REORDER_HOLD = 0.05  # seconds a reordered frame waits for one to overtake it
MAX_RULES = 256  # armed at a time (every command and frame is matched against them)
_RW = (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE, IoOpcode.WRITE_ZEROES,
       IoOpcode.WRITE_UNCORRECTABLE, IoOpcode.VERIFY, IoOpcode.ZONE_APPEND)  # CDW10-12: SLBA, NLB
_ZONE_MGMT = (IoOpcode.ZONE_MGMT_SEND, IoOpcode.ZONE_MGMT_RECV)  # CDW10-11: SLBA alone

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController


@dataclass
class _Deferred:
    due: float
    req: NvmeRequest  # HELD, its result decided


@dataclass
class FaultSet:
    """The armed rules of a process and what their firings left behind."""

    clock: Callable[[], float]
    seed: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    _deferred: list[_Deferred] = field(default_factory=list)
    _hung: list[NvmeRequest] = field(default_factory=list)
    #: held frames: (due, port, send, frame, overtaken: released after the port's next frame)
    frames: list[tuple[float, str, Callable[[bytes], None], bytes, bool]] = field(
        default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    drop_irq_cqs: set[int] = field(default_factory=set)
    #: called when something starts waiting for the clock (the runtime arms its timer)
    notify: Callable[[], None] = lambda: None
    #: called with each rule that fires (the runtime sends the FAULT_FIRED event)
    fired: Callable[[FaultRule], None] = lambda rule: None
    _next_id: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def hung(self) -> list[NvmeRequest]:
        """Requests a ``hang`` rule holds that are still outstanding."""
        self._hung = [r for r in self._hung if r.state is RequestState.HELD]
        return list(self._hung)

    @property
    def deferred(self) -> list[_Deferred]:
        """Requests a ``delay`` rule holds that are still outstanding."""
        self._deferred = [d for d in self._deferred if d.req.state is RequestState.HELD]
        return list(self._deferred)

    # ------------------------------------------------------------ rules
    def add(self, args: dict[str, Any]) -> FaultRule:
        """Arm a rule (see :meth:`FaultRule.build`); ``seed`` reseeds the RNG.

        Raises:
            FaultError: a bad field, or :data:`MAX_RULES` rules are armed already
                (nothing changed then, not even the RNG).
        """
        if len(self.rules) >= MAX_RULES:
            raise FaultError(f"at most {MAX_RULES} rules are armed at a time: fault.clear first")
        args = dict(args)
        seed = checked_int(args.pop("seed"), "seed", 0, U64) if "seed" in args else None
        rule = FaultRule.build(self._next_id, args)
        if seed is not None:
            self.rng.seed(seed)
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def clear(self, rule_id: int | None = None) -> int:
        """Drop one rule (or all); returns how many went.  Held commands stay held."""
        before = len(self.rules)
        self.rules = [r for r in self.rules if rule_id is not None and r.id != rule_id]
        return before - len(self.rules)

    def _fire(self, rule: FaultRule) -> bool:
        rule.seen += 1
        if rule.spent:
            return False
        if rule.probability < 1.0 and self.rng.random() >= rule.probability:
            return False
        rule.hits += 1
        key = f"{rule.target}.{rule.action}"
        self.counters[key] = self.counters.get(key, 0) + 1
        self.fired(rule)
        return True

    def stats(self) -> dict[str, Any]:
        return {"rules": [r.describe() for r in self.rules], "fired": dict(self.counters),
                "hung_commands": len(self.hung), "deferred_completions": len(self.deferred),
                "delayed_frames": len(self.frames)}

    # ------------------------------------------------------------ NVMe
    def _nvme_match(self, rule: FaultRule, qid: int, cmd: Command, ctrl: NvmeController) -> bool:
        if rule.target is not FaultTarget.NVME or rule.action is NvmeAction.REMOVE:
            return False
        if rule.qid is not None and rule.qid != qid:
            return False
        if rule.qid is None and qid == 0 and rule.opcode is None:
            return False  # unqualified rules match I/O commands only
        if rule.opcode is not None and rule.opcode != cmd.opcode:
            return False
        if rule.nsid is not None and rule.nsid != cmd.nsid:
            return False
        if rule.lba is not None:
            if qid == 0 or cmd.opcode not in _RW + _ZONE_MGMT:
                return False
            slba = cmd.cdw10 | cmd.cdw11 << 32
            nlb = (cmd.cdw12 & 0xFFFF) + 1 if cmd.opcode in _RW else 1
            if slba > rule.lba[1] or slba + nlb - 1 < rule.lba[0]:
                return False
        return True

    def submit(self, ctrl: NvmeController, req: NvmeRequest) -> Result | None:
        """The controller's fault hook: run ``req`` as the controller would
        (its public ``execute``), unless a rule says otherwise.

        Returns:
            The result to complete with now, or None when the request is held
            (hung, deferred: the controller's ``hold``) or the controller
            failed.
        """
        qid, cmd = req.qid, req.cmd
        if not self.rules:
            return ctrl.execute(req)  # nothing armed: the controller's own path
        for rule in self.rules:
            if not self._nvme_match(rule, qid, cmd, ctrl) or not self._fire(rule):
                continue
            if rule.action is NvmeAction.STATUS:
                slba = cmd.cdw10 | cmd.cdw11 << 32
                ctrl.record_error(qid, cmd, rule.status, rule.dnr,
                                  None if rule.lba is None else max(slba, rule.lba[0]))
                return rule.status, rule.dnr, 0
            if rule.action is NvmeAction.HANG:
                ctrl.hold(req)
                self._hung.append(req)
                return None
            if rule.action is NvmeAction.FATAL:
                ctrl.fatal(f"injected fault {rule.id}")
                ctrl.hold(req)  # dropped by the reset the host must do
                return None
            if rule.action is NvmeAction.EDIT:  # the controller runs what the rule made of it
                req.cmd = cmd.replace(**rule.edit)
                return ctrl.execute(req)
            if rule.action in (NvmeAction.CORRUPT_GUARD, NvmeAction.CORRUPT_REFTAG):
                return self._corrupt_pi(ctrl, req, rule)
            result = ctrl.execute(req)
            if rule.action is NvmeAction.DROP_IRQ:
                self.drop_irq_cqs.add(req.sq.cqid)
                return result
            if result is not None:  # delay
                ctrl.hold(req, result)
                self._deferred.append(_Deferred(self.clock() + rule.delay, req))
                self.notify()
            return None
        return ctrl.execute(req)

    @staticmethod
    def _corrupt_pi(ctrl: NvmeController, req: NvmeRequest, rule: FaultRule) -> Result | None:
        """Run ``req`` with the PI tuples its read returns corrupted: those of the
        rule's LBAs, else of the command's first block."""
        first, last = rule.lba if rule.lba is not None else (req.cmd.cdw10 | req.cmd.cdw11 << 32,) * 2
        ctrl.pi_fault = PiFault(rule.action is NvmeAction.CORRUPT_REFTAG, first, last)
        try:
            return ctrl.execute(req)
        finally:
            ctrl.pi_fault = None

    def release(self, ctrl: NvmeController) -> bool:
        """Complete the deferred requests that are due (those a reset, a
        Delete I/O Queue or an Abort finished are forgotten).  True if any
        completion was posted."""
        if not self._deferred:  # (every processing pass calls this)
            return False
        now, did = self.clock(), False
        for d in self.deferred:
            if d.due <= now:
                assert d.req.result is not None
                did |= ctrl.complete(d.req, d.req.result)
        self._deferred = [d for d in self._deferred if d.req.state is RequestState.HELD]
        return did

    def drop_interrupt(self, cqid: int) -> bool:
        """Whether the interrupt due for ``cqid`` is to be swallowed (once)."""
        if cqid in self.drop_irq_cqs:
            self.drop_irq_cqs.discard(cqid)
            return True
        return False

    @property
    def waiting(self) -> bool:
        """Anything a timer has to release later."""
        return bool(self.deferred or self.frames)

    # ------------------------------------------------------------ live handoff
    def export_state(self) -> dict[str, Any]:
        """What moves to another process with a live handoff (JSON-able): the
        rules with their hits, the counters, the RNG, the CQs whose next
        interrupt is to be dropped and the hung commands (by queue and CID).
        Deferred completions and held frames do not move (the handoff waits
        until there are none)."""
        version, internal, gauss = self.rng.getstate()
        return {"rules": [r.state() for r in self.rules], "counters": dict(self.counters),
                "next_id": self._next_id, "rng": [version, list(internal), gauss],
                "drop_irq_cqs": sorted(self.drop_irq_cqs),
                "hung": [[h.qid, h.cid] for h in self.hung]}

    def import_state(self, state: Any, ctrl: NvmeController | None = None) -> None:
        """Take over :meth:`export_state` of the source; ``ctrl``: the restored
        controller (hung commands are held again on its submission queues; with
        None only the state is checked).  All or nothing.

        Raises:
            FaultError: a field that does not fit, more than :data:`MAX_RULES`
                rules, a rule id twice or not below ``next_id``, a hung command
                named twice (nothing changed then).
        """
        try:
            rules = []
            for item in state["rules"]:
                rules.append(FaultRule.from_state(item))
            counters = {str(k): checked_int(v, k) for k, v in dict(state["counters"]).items()}
            next_id = checked_int(state["next_id"], "next_id")
            version, internal, gauss = state["rng"]
            rng = random.Random()
            rng.setstate((version, tuple(internal), gauss))
            drop = {checked_int(q, "drop_irq_cqs") for q in state["drop_irq_cqs"]}
            hung = [(checked_int(q, "hung"), checked_int(c, "hung")) for q, c in state["hung"]]
        except FaultError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # OverflowError: an RNG state word outside 0..2**32-1
            raise FaultError(f"fault state: {exc!r}") from None
        ids = [r.id for r in rules]
        if len(rules) > MAX_RULES:
            raise FaultError(f"fault state: {len(rules)} rules, at most {MAX_RULES} are armed")
        if len(set(ids)) != len(ids) or any(i >= next_id for i in ids):
            raise FaultError(f"fault state: rule ids must differ and be below next_id {next_id}")
        if len(set(hung)) != len(hung):
            raise FaultError(f"fault state: a hung command named twice: {hung}")
        if ctrl is not None and any(q not in ctrl.sqs for q, _ in hung):
            raise FaultError(f"fault state: a hung command on a queue that does not exist: {hung}")
        if ctrl is None:
            return
        self.rules, self.counters, self._next_id, self.rng = rules, counters, next_id, rng
        self.drop_irq_cqs = drop
        self._hung = []
        for qid, cid in hung:  # the command itself stays in the host's SQ: only its CID matters
            req = NvmeRequest(ctrl.sqs[qid], Command(cid=cid))
            ctrl.hold(req)
            self._hung.append(req)

    # ------------------------------------------------------------ net
    def frame(self, port: str, direction: Direction, frame: bytes,
              send: Callable[[bytes], None]) -> list[bytes]:
        """The frames to pass on now in place of ``frame`` (may be none)."""
        for rule in self.rules:
            if (rule.target is not FaultTarget.NET or (rule.port is not None and rule.port != port)
                    or rule.direction not in (direction, Direction.BOTH) or not self._fire(rule)):
                continue
            if rule.action is NetAction.DROP:
                return []
            if rule.action is NetAction.CORRUPT:
                data = bytearray(frame)
                # flip one byte past the Ethernet header so the frame still switches
                pos = 14 + self.rng.randrange(max(1, len(data) - 14)) if len(data) > 14 else 0
                data[pos] ^= 0xFF
                return [bytes(data)]
            if rule.action is NetAction.DUPLICATE:
                return [frame, frame]
            reorder = rule.action is NetAction.REORDER
            # reorder: held until the port's next frame passed (or 50 ms, if none comes)
            delay = rule.delay if not reorder else REORDER_HOLD
            self.frames.append((self.clock() + delay, port, send, frame, reorder))
            self.notify()
            return []
        out = [frame]
        if self.frames:  # a reordered frame follows the one that overtook it
            later = [f for f in self.frames if f[4] and f[1] == port and f[2] == send]
            for f in later:
                self.frames.remove(f)
                out.append(f[3])
        return out

    def due_frames(self) -> list[tuple[Callable[[bytes], None], bytes]]:
        """Delayed frames whose time has come, with where they go."""
        now = self.clock()
        due = [f for f in self.frames if f[0] <= now]
        self.frames = [f for f in self.frames if f[0] > now]
        return [(f[2], f[3]) for f in due]
