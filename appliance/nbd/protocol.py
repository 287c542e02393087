"""The sans-I/O NBD client connection (NetworkBlockDevice/nbd ``doc/proto.md``).

Theory of operation
-------------------
:class:`NbdClientConnection` takes the server's bytes (:meth:`receive_data`),
hands back the bytes to send (:meth:`data_to_send`) and yields events
(:meth:`next_event`: :class:`Negotiated` once, then one :class:`Reply` per
request; :data:`NEED_DATA` when more bytes are needed).  The caller owns the
socket and the clock.

Handshake (fixed newstyle only): the greeting must offer FIXED_NEWSTYLE; the
client answers with its flags, asks for structured replies
(``NBD_OPT_STRUCTURED_REPLY``; a server that refuses it gets simple replies)
and then ``NBD_OPT_GO`` for the export with ``NBD_INFO_BLOCK_SIZE`` requested
(so the client promises to honour the block sizes).  The GO must bring an
``NBD_INFO_EXPORT`` before its ACK; the block sizes are checked against the
spec's rules.  A refused option ends the handshake with :class:`NbdRefused`.

Transmission: :meth:`request` checks what the client is about to ask (the
export's flags allow it, the range is inside the export and aligned to the
minimum block size, the length within the maximum) and returns its cookie.
Each reply is checked before anything of it is used: the magic, a cookie we
sent and have not seen answered, a simple reply never to a READ once structured
replies are on, chunk types allowed for the command, chunk lengths, data and
hole chunks inside the request and never overlapping, a successful READ
covered completely, error values nonzero.  A server that breaks a rule gets
:class:`NbdProtocolError`: the connection is not usable after it.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Final

from appliance.errors import RemoteProtocolError
from appliance.nbd import wire as w


class NbdProtocolError(RemoteProtocolError):
    """The server broke the NBD protocol: the connection is finished."""


class NbdRefused(RemoteProtocolError):
    """The server refused the handshake (no such export, policy, ...)."""


class NbdUsageError(ValueError):
    """A request the export does not allow (read-only, no FUA, out of range, ...)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True)
class ExportInfo:
    """What NBD_OPT_GO told about the export."""

    size: int
    flags: int  # transmission flags
    minimum: int = 1  # block sizes (1 / 4096 / 32 MiB without NBD_INFO_BLOCK_SIZE)
    preferred: int = 4096
    maximum: int = w.DEFAULT_MAX_PAYLOAD
    structured: bool = False  # structured replies negotiated

    @property
    def read_only(self) -> bool:
        return bool(self.flags & w.TF_READ_ONLY)

    def can(self, flag: int) -> bool:
        """Whether the transmission flag ``flag`` is set."""
        return bool(self.flags & flag)


@dataclass(frozen=True)
class Negotiated:
    """The handshake finished: requests may be sent."""

    info: ExportInfo


@dataclass(frozen=True)
class Reply:
    """A request's answer: ``error`` 0 (success) or an errno, with the server's
    message if it sent one; ``data`` is a READ's bytes."""

    cookie: int
    error: int = 0
    message: str = ""
    data: bytes = b""


Event = Negotiated | Reply


class State(enum.Enum):
    GREETING = "greeting"
    STRUCTURED_REPLY = "structured-reply option"
    GO = "go option"
    READY = "transmission"
    CLOSED = "closed"


@dataclass
class _Pending:
    cmd: w.Cmd
    offset: int
    length: int
    data: bytearray = field(default_factory=bytearray)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (start, end) received
    error: int = 0
    message: str = ""


MAX_OPTION_REPLY = 1 << 16  # an option reply payload larger than this is refused
BLOCK_SIZE_REQUESTS = (w.Info.BLOCK_SIZE,)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _text(data: bytes) -> str:
    """A server's string, printable (for messages)."""
    return "".join(c if c.isprintable() else "?" for c in data.decode("utf-8", "replace"))


class NbdClientConnection:
    """One client's side of one NBD connection, without I/O."""

    def __init__(self, export: str, structured_replies: bool = True) -> None:
        """Prepare to negotiate ``export`` (the server speaks first).

        Raises:
            NbdUsageError: the export name is too long or holds a NUL.
        """
        name = export.encode()
        if len(name) > w.MAX_STRING or b"\0" in name:
            raise NbdUsageError(f"export name too long or with a NUL: {export!r}")
        self.export = name
        self.want_structured = structured_replies
        self.state = State.GREETING
        self.info: ExportInfo | None = None
        self._structured = False
        self._export_info: w.InfoExport | None = None
        self._block_size: w.InfoBlockSize | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0

    # ------------------------------------------------------------ I/O
    def receive_data(self, data: bytes) -> None:
        """Bytes from the server (b"": it closed the connection)."""
        if not data and self.state is not State.CLOSED:
            was, self.state = self.state, State.CLOSED
            if self._pending or was is not State.READY or self._in:
                raise NbdProtocolError(f"the server closed the connection in {was.value}")
        self._in += data

    def data_to_send(self) -> bytes:
        """What to write to the server now (and forget)."""
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    def next_event(self) -> Event | _NeedData:
        """The next event the received bytes make, or :data:`NEED_DATA`.

        Raises:
            NbdProtocolError: the server broke the protocol.
            NbdRefused: the server refused the export.
        """
        while True:
            if self.state is State.GREETING:
                if not self._greeting():
                    return NEED_DATA
            elif self.state in (State.STRUCTURED_REPLY, State.GO):
                event = self._option_reply()
                if event is not None:
                    return event
            elif self.state is State.READY:
                reply = self._transmission_reply()
                if reply is not None:
                    return reply
            else:
                return NEED_DATA

    # ------------------------------------------------------------ requests
    def request(self, cmd: w.Cmd, offset: int = 0, length: int = 0, *, fua: bool = False,
                no_hole: bool = False, payload: bytes | memoryview = b"") -> int:
        """Queue one request; returns its cookie (its :class:`Reply` carries it).

        Raises:
            NbdUsageError: the export does not allow it, or the range is bad.
        """
        info = self.info
        if self.state is not State.READY or info is None:
            raise NbdUsageError(f"no request in state {self.state.value}")
        flags = 0
        if cmd is w.Cmd.WRITE:
            length = len(payload)
        elif payload:
            raise NbdUsageError(f"{cmd.name} carries no data")
        writes = cmd in (w.Cmd.WRITE, w.Cmd.TRIM, w.Cmd.WRITE_ZEROES)
        if writes and info.read_only:
            raise NbdUsageError(f"{cmd.name} on a read-only export")
        needs = {w.Cmd.FLUSH: w.TF_SEND_FLUSH, w.Cmd.TRIM: w.TF_SEND_TRIM,
                 w.Cmd.WRITE_ZEROES: w.TF_SEND_WRITE_ZEROES}.get(cmd)
        if needs is not None and not info.can(needs):
            raise NbdUsageError(f"the export does not take {cmd.name}")
        if fua:
            if not writes or not info.can(w.TF_SEND_FUA):
                raise NbdUsageError(f"no FUA on {cmd.name} here")
            flags |= w.CMD_FLAG_FUA
        if no_hole:
            if cmd is not w.Cmd.WRITE_ZEROES:
                raise NbdUsageError("NO_HOLE is for WRITE_ZEROES only")
            flags |= w.CMD_FLAG_NO_HOLE
        if cmd in (w.Cmd.FLUSH, w.Cmd.DISC):
            offset = length = 0
        else:
            if length <= 0 or offset < 0 or offset + length > info.size:
                raise NbdUsageError(f"{cmd.name} {offset}+{length} outside the export "
                                    f"({info.size} bytes)")
            if offset % info.minimum or length % info.minimum:
                raise NbdUsageError(f"{cmd.name} {offset}+{length} not aligned to the "
                                    f"minimum block size {info.minimum}")
            if cmd in (w.Cmd.READ, w.Cmd.WRITE) and length > info.maximum:
                raise NbdUsageError(f"{cmd.name} of {length} bytes past the maximum "
                                    f"{info.maximum}")
            if length > 0xFFFFFFFF:
                raise NbdUsageError(f"{cmd.name} of {length} bytes does not fit 32 bits")
        self._cookie += 1
        cookie = self._cookie
        self._out += w.Request(flags=flags, type=cmd, cookie=cookie, offset=offset,
                               length=length).pack()
        if cmd is w.Cmd.WRITE:
            self._out += payload
        if cmd is w.Cmd.DISC:
            self.state = State.CLOSED  # no reply comes
        else:
            self._pending[cookie] = _Pending(cmd, offset, length,
                                             bytearray(length if cmd is w.Cmd.READ else 0))
        return cookie

    # ------------------------------------------------------------ handshake
    def _greeting(self) -> bool:
        if len(self._in) < w.Greeting.SIZE:
            return False
        hello = w.Greeting.unpack(self._in)
        del self._in[:w.Greeting.SIZE]
        if hello.nbdmagic != w.NBDMAGIC:
            raise NbdProtocolError(f"not an NBD server (magic {hello.nbdmagic:#x})")
        if hello.ihaveopt != w.IHAVEOPT:
            raise NbdProtocolError("oldstyle NBD server (only fixed newstyle is spoken)")
        if not hello.flags & w.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the server is not fixed newstyle")
        flags = w.FLAG_C_FIXED_NEWSTYLE | (hello.flags & w.FLAG_NO_ZEROES and w.FLAG_C_NO_ZEROES)
        self._out += flags.to_bytes(4, "big")
        if self.want_structured:
            self._option(w.Opt.STRUCTURED_REPLY, b"")
            self.state = State.STRUCTURED_REPLY
        else:
            self._go()
        return True

    def _option(self, option: w.Opt, data: bytes) -> None:
        self._out += w.OptionRequest(option=option, length=len(data)).pack() + data

    def _go(self) -> None:
        data = (len(self.export).to_bytes(4, "big") + self.export
                + len(BLOCK_SIZE_REQUESTS).to_bytes(2, "big")
                + b"".join(int(i).to_bytes(2, "big") for i in BLOCK_SIZE_REQUESTS))
        self._option(w.Opt.GO, data)
        self.state = State.GO

    def _option_reply(self) -> Event | _NeedData | None:
        """An event, NEED_DATA, or None: a reply was taken, look again."""
        if len(self._in) < w.OptionReply.SIZE:
            return NEED_DATA
        head = w.OptionReply.unpack(self._in)
        if head.magic != w.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"option reply magic {head.magic:#x}")
        asked = w.Opt.STRUCTURED_REPLY if self.state is State.STRUCTURED_REPLY else w.Opt.GO
        if head.option != asked:
            raise NbdProtocolError(f"a reply to option {head.option}, {asked.name} was asked")
        if head.length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"option reply of {head.length} bytes")
        end = w.OptionReply.SIZE + head.length
        if len(self._in) < end:
            return NEED_DATA
        data = bytes(self._in[w.OptionReply.SIZE:end])
        del self._in[:end]
        if head.reply & w.REP_ERROR_BIT:
            why = w.REP_ERRORS.get(head.reply, f"error {head.reply:#x}")
            if asked is w.Opt.STRUCTURED_REPLY:
                self._go()  # simple replies then
                return None
            text = f": {_text(data)}" if data else ""
            raise NbdRefused(f"export {_text(self.export)!r}: {why}{text}")
        if asked is w.Opt.STRUCTURED_REPLY:
            if head.reply != w.Rep.ACK or data:
                raise NbdProtocolError(f"STRUCTURED_REPLY answered with reply {head.reply} "
                                       f"({len(data)} bytes)")
            self._structured = True
            self._go()
            return None
        if head.reply == w.Rep.INFO:
            self._info(data)
            return None
        if head.reply != w.Rep.ACK or data:
            raise NbdProtocolError(f"GO answered with reply {head.reply} ({len(data)} bytes)")
        return self._negotiated()

    def _info(self, data: bytes) -> None:
        if len(data) < 2:
            raise NbdProtocolError(f"NBD_REP_INFO of {len(data)} bytes")
        kind = int.from_bytes(data[:2], "big")
        if kind == w.Info.EXPORT:
            if len(data) != w.InfoExport.SIZE:
                raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            self._export_info = w.InfoExport.unpack(data)
        elif kind == w.Info.BLOCK_SIZE:
            if len(data) != w.InfoBlockSize.SIZE:
                raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            self._block_size = w.InfoBlockSize.unpack(data)
        # NAME, DESCRIPTION and types we do not know are informational: ignored

    def _negotiated(self) -> Negotiated:
        ex = self._export_info
        if ex is None:
            raise NbdProtocolError("GO acknowledged without NBD_INFO_EXPORT")
        if not ex.flags & w.TF_HAS_FLAGS:
            raise NbdProtocolError(f"transmission flags {ex.flags:#x} without HAS_FLAGS")
        if ex.size >= 1 << 63:
            raise NbdProtocolError(f"export size {ex.size} past 2^63")
        info = ExportInfo(size=ex.size, flags=ex.flags, structured=self._structured)
        bs = self._block_size
        if bs is not None:
            if not _power_of_two(bs.minimum) or bs.minimum > w.MAX_MIN_BLOCK:
                raise NbdProtocolError(f"minimum block size {bs.minimum}")
            if not _power_of_two(bs.preferred) or bs.preferred < bs.minimum:
                raise NbdProtocolError(f"preferred block size {bs.preferred} "
                                       f"(minimum {bs.minimum})")
            if bs.maximum != 0xFFFFFFFF and (bs.maximum < bs.minimum
                                             or bs.maximum % bs.minimum):
                raise NbdProtocolError(f"maximum block size {bs.maximum} "
                                       f"(minimum {bs.minimum})")
            maximum = min(bs.maximum, w.DEFAULT_MAX_PAYLOAD)
            maximum -= maximum % bs.minimum
            info = ExportInfo(size=ex.size, flags=ex.flags, minimum=bs.minimum,
                              preferred=bs.preferred, maximum=maximum,
                              structured=self._structured)
        self.info = info
        self.state = State.READY
        return Negotiated(info)

    # ------------------------------------------------------------ transmission
    def _transmission_reply(self) -> Reply | _NeedData | None:
        """A reply, NEED_DATA, or None: a chunk was taken, look again."""
        if len(self._in) < 4:
            return NEED_DATA
        magic = int.from_bytes(self._in[:4], "big")
        if magic == w.SIMPLE_REPLY_MAGIC:
            return self._simple_reply()
        if magic == w.STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise NbdProtocolError("a structured reply, structured replies were not "
                                       "negotiated")
            return self._chunk()
        raise NbdProtocolError(f"reply magic {magic:#x}")

    def _find(self, cookie: int) -> _Pending:
        req = self._pending.get(cookie)
        if req is None:
            raise NbdProtocolError(f"a reply for cookie {cookie}, which is not in flight")
        return req

    def _simple_reply(self) -> Reply | _NeedData:
        if len(self._in) < w.SimpleReply.SIZE:
            return NEED_DATA
        head = w.SimpleReply.unpack(self._in)
        req = self._find(head.cookie)
        if req.cmd is w.Cmd.READ and self._structured:
            raise NbdProtocolError("a simple reply to a READ under structured replies")
        size = w.SimpleReply.SIZE + (req.length if req.cmd is w.Cmd.READ and not head.error
                                     else 0)
        if len(self._in) < size:
            return NEED_DATA
        data = bytes(self._in[w.SimpleReply.SIZE:size])
        del self._in[:size]
        del self._pending[head.cookie]
        return Reply(head.cookie, _errno(head.error), data=data)

    def _chunk(self) -> Reply | _NeedData | None:
        if len(self._in) < w.ChunkHeader.SIZE:
            return NEED_DATA
        head = w.ChunkHeader.unpack(self._in)
        req = self._find(head.cookie)
        if head.flags & ~w.REPLY_FLAG_DONE:
            raise NbdProtocolError(f"chunk flags {head.flags:#x}")
        limit = (req.length if req.cmd is w.Cmd.READ else 0) + 8 + 6 + w.MAX_STRING
        if head.length > limit:
            raise NbdProtocolError(f"a chunk of {head.length} bytes for a "
                                   f"{req.cmd.name} of {req.length}")
        end = w.ChunkHeader.SIZE + head.length
        if len(self._in) < end:
            return NEED_DATA
        payload = memoryview(bytes(self._in[w.ChunkHeader.SIZE:end]))
        del self._in[:end]
        self._apply_chunk(req, head.type, payload)
        if not head.flags & w.REPLY_FLAG_DONE:
            return None
        del self._pending[head.cookie]
        covered = sum(end - start for start, end in req.chunks)
        if req.cmd is w.Cmd.READ and not req.error and covered != req.length:
            raise NbdProtocolError(f"READ {req.offset}+{req.length} answered without "
                                   "all its data")
        data = bytes(req.data) if req.cmd is w.Cmd.READ and not req.error else b""
        return Reply(head.cookie, req.error, req.message, data)

    def _apply_chunk(self, req: _Pending, kind: int, payload: memoryview) -> None:
        if kind == w.ReplyType.NONE:
            if payload:
                raise NbdProtocolError(f"NBD_REPLY_TYPE_NONE of {len(payload)} bytes")
            return
        if kind & w.REPLY_ERROR_BIT:
            self._error_chunk(req, kind, payload)
            return
        if req.cmd is not w.Cmd.READ or kind not in (w.ReplyType.OFFSET_DATA,
                                                     w.ReplyType.OFFSET_HOLE):
            raise NbdProtocolError(f"chunk type {kind} for a {req.cmd.name}")
        if len(payload) < 8:
            raise NbdProtocolError(f"chunk type {kind} of {len(payload)} bytes")
        offset = int.from_bytes(payload[:8], "big")
        if kind == w.ReplyType.OFFSET_DATA:
            data = payload[8:]
            size = len(data)
        else:
            if len(payload) != 12:
                raise NbdProtocolError(f"OFFSET_HOLE of {len(payload)} bytes")
            size, data = int.from_bytes(payload[8:12], "big"), None
        start = offset - req.offset
        if size == 0 or start < 0 or start + size > req.length:
            raise NbdProtocolError(f"chunk {offset}+{size} outside READ "
                                   f"{req.offset}+{req.length}")
        for a, b in req.chunks:
            if start < b and a < start + size:
                raise NbdProtocolError(f"chunk {offset}+{size} overlaps one already sent")
        req.chunks.append((start, start + size))
        if data is not None:
            req.data[start:start + size] = data
        # a hole: the buffer holds zeroes there already

    def _error_chunk(self, req: _Pending, kind: int, payload: memoryview) -> None:
        if len(payload) < w.ErrorChunk.SIZE:
            raise NbdProtocolError(f"error chunk of {len(payload)} bytes")
        head = w.ErrorChunk.unpack(payload)
        rest = payload[w.ErrorChunk.SIZE:]
        if head.message_length > len(rest):
            raise NbdProtocolError(f"error message of {head.message_length} bytes in "
                                   f"{len(rest)}")
        if head.error == 0:
            raise NbdProtocolError("an error chunk with error 0")
        if kind == w.ReplyType.ERROR_OFFSET:
            if len(rest) != head.message_length + 8:
                raise NbdProtocolError("ERROR_OFFSET without its offset")
            at = int.from_bytes(rest[head.message_length:], "big")
            if not req.offset <= at < req.offset + max(req.length, 1):
                raise NbdProtocolError(f"error offset {at} outside {req.offset}+{req.length}")
        elif kind == w.ReplyType.ERROR and len(rest) != head.message_length:
            raise NbdProtocolError("trailing bytes after an error message")
        if not req.error:
            req.error = _errno(head.error)
            req.message = _text(bytes(rest[:head.message_length]))


def _errno(value: int) -> int:
    """An NBD error value as an errno (unexpected values read as EINVAL)."""
    if value == 0:
        return 0
    return value if value in w.ERRORS else errno.EINVAL
