"""A hostile NBD server: every reply the client gets is checked before it is used.

The sans-I/O client (appliance.nbd.protocol) is fed crafted server bytes; the
runtime client (appliance.runtime.nbd) meets a server thread on a Unix socket
that breaks the protocol mid-transmission."""

from __future__ import annotations

import errno
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.nbd import wire as w
from appliance.nbd.protocol import (
    NEED_DATA,
    NbdClientConnection,
    NbdProtocolError,
    NbdRefused,
    NbdUsageError,
    Negotiated,
    Reply,
)
from appliance.runtime.nbd import NbdExport

SIZE = 1 << 20
FLAGS = (w.TF_HAS_FLAGS | w.TF_SEND_FLUSH | w.TF_SEND_FUA | w.TF_SEND_TRIM
         | w.TF_SEND_WRITE_ZEROES)


def greeting(flags: int = w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES,
             magic: int = w.NBDMAGIC, opt: int = w.IHAVEOPT) -> bytes:
    return w.Greeting(nbdmagic=magic, ihaveopt=opt, flags=flags).pack()


def opt_reply(option: int, reply: int, data: bytes = b"",
              magic: int = w.OPTION_REPLY_MAGIC) -> bytes:
    return w.OptionReply(magic=magic, option=option, reply=reply, length=len(data)).pack() + data


def info_export(size: int = SIZE, flags: int = FLAGS) -> bytes:
    return opt_reply(w.Opt.GO, w.Rep.INFO, w.InfoExport(info=w.Info.EXPORT, size=size,
                                                          flags=flags).pack())


def info_block(minimum: int, preferred: int, maximum: int) -> bytes:
    return opt_reply(w.Opt.GO, w.Rep.INFO, w.InfoBlockSize(
        info=w.Info.BLOCK_SIZE, minimum=minimum, preferred=preferred, maximum=maximum).pack())


def go_ack() -> bytes:
    return opt_reply(w.Opt.GO, w.Rep.ACK)


def handshake(structured: bool = True, extra: bytes = b"") -> bytes:
    sr = (opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK) if structured
          else opt_reply(w.Opt.STRUCTURED_REPLY, w.REP_ERROR_BIT | 1))
    return greeting() + sr + extra + info_export() + go_ack()


def feed(conn: NbdClientConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def ready(structured: bool = True) -> NbdClientConnection:
    conn = NbdClientConnection("disk")
    [event] = feed(conn, handshake(structured))
    assert isinstance(event, Negotiated) and event.info.structured is structured
    conn.data_to_send()
    return conn


def chunk(cookie: int, kind: int, payload: bytes, flags: int = w.REPLY_FLAG_DONE) -> bytes:
    return w.ChunkHeader(magic=w.STRUCTURED_REPLY_MAGIC, flags=flags, type=kind,
                         cookie=cookie, length=len(payload)).pack() + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return chunk(cookie, w.ReplyType.OFFSET_DATA, offset.to_bytes(8, "big") + data,
                 w.REPLY_FLAG_DONE if done else 0)


def error_chunk(cookie: int, error: int, message: bytes = b"", kind: int = w.ReplyType.ERROR,
                tail: bytes = b"") -> bytes:
    return chunk(cookie, kind, w.ErrorChunk(error=error, message_length=len(message)).pack()
                 + message + tail)


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return w.SimpleReply(magic=w.SIMPLE_REPLY_MAGIC, error=error, cookie=cookie).pack() + data


# ------------------------------------------------------------------ handshake
def test_the_client_speaks_fixed_newstyle_and_asks_for_what_it_needs() -> None:
    conn = NbdClientConnection("disk")
    feed(conn, greeting())
    out = conn.data_to_send()
    assert int.from_bytes(out[:4], "big") == w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES
    opt = w.OptionRequest.unpack(out, 4)
    assert (opt.magic, opt.option, opt.length) == (w.IHAVEOPT, w.Opt.STRUCTURED_REPLY, 0)
    feed(conn, opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK))
    out = conn.data_to_send()
    go = w.OptionRequest.unpack(out)
    body = out[w.OptionRequest.SIZE:]
    assert go.option == w.Opt.GO and go.length == len(body)
    assert body == (4).to_bytes(4, "big") + b"disk" + (1).to_bytes(2, "big") + \
        int(w.Info.BLOCK_SIZE).to_bytes(2, "big")


def test_byte_by_byte_gives_the_same_events() -> None:
    whole = NbdClientConnection("disk")
    events = feed(whole, handshake(extra=info_block(512, 4096, 1 << 20)))
    trickled = NbdClientConnection("disk")
    got: list[object] = []
    for b in handshake(extra=info_block(512, 4096, 1 << 20)):
        got += feed(trickled, bytes([b]))
    assert got == events


BROKEN_HANDSHAKES = [
    (greeting(magic=0x1234), "not an NBD server"),
    (greeting(opt=0x00420281861253), "oldstyle"),
    (greeting(flags=0), "not fixed newstyle"),
    (greeting() + opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK, magic=7), "option reply magic"),
    (greeting() + opt_reply(w.Opt.GO, w.Rep.ACK), "STRUCTURED_REPLY was asked"),
    (greeting() + opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK, b"x"), "answered with"),
    (greeting() + w.OptionReply(magic=w.OPTION_REPLY_MAGIC, option=w.Opt.STRUCTURED_REPLY,
                                reply=w.Rep.ACK, length=1 << 30).pack(), "option reply of"),
    (handshake().replace(info_export(), b""), "without NBD_INFO_EXPORT"),
    (handshake().replace(info_export(), info_export(flags=FLAGS & ~w.TF_HAS_FLAGS)),
     "without HAS_FLAGS"),
    (handshake().replace(info_export(), info_export(size=1 << 63)), "past 2\\^63"),
    (handshake().replace(info_export(), opt_reply(w.Opt.GO, w.Rep.INFO, b"\0\0" + b"\0" * 9)),
     "NBD_INFO_EXPORT of 11"),
    (handshake().replace(info_export(), opt_reply(w.Opt.GO, w.Rep.INFO, b"\0")),
     "NBD_REP_INFO of 1"),
    (handshake(extra=info_block(3, 4096, 1 << 20)), "minimum block size 3"),
    (handshake(extra=info_block(1 << 17, 1 << 17, 1 << 20)), "minimum block size"),
    (handshake(extra=info_block(4096, 512, 1 << 20)), "preferred block size"),
    (handshake(extra=info_block(512, 4096, 1000)), "maximum block size"),
    (handshake(extra=opt_reply(w.Opt.GO, w.Rep.SERVER, b"")), "GO answered with"),
]


@pytest.mark.parametrize("server_bytes, why", BROKEN_HANDSHAKES,
                         ids=[why for _, why in BROKEN_HANDSHAKES])
def test_a_broken_handshake_is_refused(server_bytes: bytes, why: str) -> None:
    conn = NbdClientConnection("disk")
    with pytest.raises(NbdProtocolError, match=why):
        feed(conn, server_bytes)


def test_a_refused_export_says_why() -> None:
    conn = NbdClientConnection("disk")
    with pytest.raises(NbdRefused, match="unknown export: no disk here"):
        feed(conn, greeting() + opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK)
             + opt_reply(w.Opt.GO, w.REP_ERROR_BIT | 6, b"no disk here"))


def test_names_and_unknown_infos_are_ignored_block_sizes_kept() -> None:
    conn = NbdClientConnection("disk")
    [event] = feed(conn, handshake(extra=opt_reply(w.Opt.GO, w.Rep.INFO, b"\0\1disk")
                                   + opt_reply(w.Opt.GO, w.Rep.INFO, b"\0\x63??")
                                   + info_block(512, 4096, 0xFFFFFFFF)))
    assert isinstance(event, Negotiated)
    assert (event.info.minimum, event.info.maximum) == (512, w.DEFAULT_MAX_PAYLOAD)


def test_the_server_closing_mid_handshake_is_an_error() -> None:
    conn = NbdClientConnection("disk")
    feed(conn, greeting())
    with pytest.raises(NbdProtocolError, match="closed"):
        feed(conn, b"")


# ------------------------------------------------------------------ requests
def test_requests_the_export_does_not_allow_never_reach_the_wire() -> None:
    conn = NbdClientConnection("disk")
    feed(conn, handshake(extra=info_block(512, 4096, 64 << 10)).replace(
        info_export(), info_export(flags=w.TF_HAS_FLAGS | w.TF_READ_ONLY)))
    conn.data_to_send()
    bad: list[Callable[[], int]] = [
        lambda: conn.request(w.Cmd.WRITE, 0, payload=b"x" * 512),
        lambda: conn.request(w.Cmd.TRIM, 0, 512),
        lambda: conn.request(w.Cmd.FLUSH),
        lambda: conn.request(w.Cmd.READ, 0, 512, fua=True),
        lambda: conn.request(w.Cmd.READ, 100, 512),
        lambda: conn.request(w.Cmd.READ, 0, 128 << 10),
        lambda: conn.request(w.Cmd.READ, SIZE - 512, 1024),
        lambda: conn.request(w.Cmd.READ, 0, 0),
    ]
    for call in bad:
        with pytest.raises(NbdUsageError):
            call()
    assert conn.data_to_send() == b"" and conn.pending == 0


def test_a_good_read_in_chunks_and_holes() -> None:
    conn = ready()
    cookie = conn.request(w.Cmd.READ, 4096, 4096)
    req = w.Request.unpack(conn.data_to_send())
    assert (req.type, req.offset, req.length, req.cookie) == (w.Cmd.READ, 4096, 4096, cookie)
    hole = chunk(cookie, w.ReplyType.OFFSET_HOLE, (4096 + 1024).to_bytes(8, "big")
                 + (3072).to_bytes(4, "big"), flags=0)
    [reply] = feed(conn, data_chunk(cookie, 4096, b"\x11" * 1024, done=False) + hole
                   + chunk(cookie, w.ReplyType.NONE, b""))
    assert reply == Reply(cookie, 0, "", b"\x11" * 1024 + bytes(3072))


def test_simple_replies_when_structured_replies_were_refused() -> None:
    conn = ready(structured=False)
    cookie = conn.request(w.Cmd.READ, 0, 512)
    [reply] = feed(conn, simple(cookie, data=b"\x22" * 512))
    assert reply == Reply(cookie, 0, "", b"\x22" * 512)
    cookie = conn.request(w.Cmd.WRITE, 0, payload=b"\0" * 512)
    [reply] = feed(conn, simple(cookie, error=errno.ENOSPC))
    assert reply == Reply(cookie, errno.ENOSPC)


def test_errors_carry_the_servers_errno_and_message() -> None:
    conn = ready()
    c1 = conn.request(w.Cmd.READ, 0, 512)
    c2 = conn.request(w.Cmd.WRITE, 512, payload=b"x" * 512)
    c3 = conn.request(w.Cmd.FLUSH)
    events = feed(conn, error_chunk(c1, errno.EIO, b"bad sector", kind=w.ReplyType.ERROR_OFFSET,
                                    tail=(256).to_bytes(8, "big"))
                  + simple(c3) + error_chunk(c2, 0x1234))
    assert events == [Reply(c1, errno.EIO, "bad sector"), Reply(c3),
                      Reply(c2, errno.EINVAL)]  # an unexpected value reads as EINVAL


def hostile_replies() -> list[tuple[str, Callable[[int], bytes], str]]:
    """(name, reply bytes for a READ 4096+4096 with this cookie, the complaint)."""
    return [
        ("unknown cookie", lambda c: data_chunk(c + 7, 4096, bytes(4096)), "not in flight"),
        ("bad magic", lambda c: b"\xde\xad\xbe\xef" + bytes(24), "reply magic"),
        ("simple reply to a read", lambda c: simple(c, data=bytes(4096)),
         "simple reply to a READ"),
        ("chunk before the range", lambda c: data_chunk(c, 0, bytes(4096)), "outside"),
        ("chunk past the range", lambda c: data_chunk(c, 8192 - 512, bytes(1024)), "outside"),
        ("empty data chunk", lambda c: data_chunk(c, 4096, b""), "outside"),
        ("overlap", lambda c: data_chunk(c, 4096, bytes(2048), done=False)
         + data_chunk(c, 4096 + 1024, bytes(3072)), "overlaps"),
        ("not all data", lambda c: data_chunk(c, 4096, bytes(2048)), "without all its data"),
        ("short hole", lambda c: chunk(c, w.ReplyType.OFFSET_HOLE, (4096).to_bytes(8, "big")
                                       + b"\0"), "OFFSET_HOLE of 9"),
        ("zero hole", lambda c: chunk(c, w.ReplyType.OFFSET_HOLE, (4096).to_bytes(8, "big")
                                      + bytes(4)), "outside"),
        ("short data", lambda c: chunk(c, w.ReplyType.OFFSET_DATA, b"\0" * 7), "of 7 bytes"),
        ("block status", lambda c: chunk(c, w.ReplyType.BLOCK_STATUS, bytes(12)),
         "chunk type 5"),
        ("unknown type", lambda c: chunk(c, 77, b""), "chunk type 77"),
        ("reserved flags", lambda c: chunk(c, w.ReplyType.NONE, b"", flags=6), "chunk flags"),
        ("none with data", lambda c: chunk(c, w.ReplyType.NONE, b"x"), "TYPE_NONE of 1"),
        ("huge chunk", lambda c: w.ChunkHeader(magic=w.STRUCTURED_REPLY_MAGIC, type=1, cookie=c,
                                                length=1 << 31).pack(), "a chunk of"),
        ("error 0", lambda c: error_chunk(c, 0), "error 0"),
        ("long message", lambda c: chunk(c, w.ReplyType.ERROR, w.ErrorChunk(
            error=5, message_length=100).pack() + b"short"), "error message of 100"),
        ("message tail", lambda c: error_chunk(c, 5, b"m", tail=b"zz"), "trailing bytes"),
        ("short error", lambda c: chunk(c, w.ReplyType.ERROR, b"\0\0\0"), "error chunk of 3"),
        ("error offset outside", lambda c: error_chunk(
            c, 5, kind=w.ReplyType.ERROR_OFFSET, tail=(0).to_bytes(8, "big")), "error offset"),
        ("error offset missing", lambda c: error_chunk(c, 5, kind=w.ReplyType.ERROR_OFFSET),
         "without its offset"),
    ]


@pytest.mark.parametrize("name, reply, why", hostile_replies(),
                         ids=[name for name, _, _ in hostile_replies()])
def test_a_hostile_reply_ends_the_connection(name: str, reply: Callable[[int], bytes],
                                            why: str) -> None:
    conn = ready()
    cookie = conn.request(w.Cmd.READ, 4096, 4096)
    with pytest.raises(NbdProtocolError, match=why):
        feed(conn, reply(cookie))


def test_a_reply_twice_is_refused() -> None:
    conn = ready()
    cookie = conn.request(w.Cmd.FLUSH)
    feed(conn, simple(cookie))
    with pytest.raises(NbdProtocolError, match="not in flight"):
        feed(conn, simple(cookie))


def test_data_chunks_for_a_write_are_refused() -> None:
    conn = ready()
    cookie = conn.request(w.Cmd.WRITE, 0, payload=b"x" * 512)
    with pytest.raises(NbdProtocolError, match="chunk type 1 for a WRITE"):
        feed(conn, data_chunk(cookie, 0, b"x"))


def test_structured_chunks_without_negotiation_are_refused() -> None:
    conn = ready(structured=False)
    cookie = conn.request(w.Cmd.READ, 0, 512)
    with pytest.raises(NbdProtocolError, match="not negotiated"):
        feed(conn, data_chunk(cookie, 0, bytes(512)))


def test_the_server_closing_with_a_request_in_flight_is_an_error() -> None:
    conn = ready()
    conn.request(w.Cmd.READ, 0, 512)
    with pytest.raises(NbdProtocolError, match="closed"):
        feed(conn, b"")


# ------------------------------------------------------------------ over a socket
def test_the_runtime_client_fails_for_good_on_a_hostile_server(tmp_path: Path) -> None:
    path = str(tmp_path / "hostile.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(greeting())
            conn.recv(4 + w.OptionRequest.SIZE)
            conn.sendall(opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK))
            conn.recv(4096)
            conn.sendall(info_export() + go_ack())
            head = w.Request.unpack(conn.recv(w.Request.SIZE))
            conn.sendall(data_chunk(head.cookie, head.offset + 1, bytes(head.length)))
            conn.recv(4096)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    export = NbdExport(f"nbd+unix:///disk?socket={path}", timeout=10)
    try:
        assert export.size == SIZE
        for _ in range(2):
            with pytest.raises(OSError) as err:
                export.pread(512, 0)
            assert err.value.errno == errno.EIO
    finally:
        export.close()
        thread.join(10)
        listener.close()


def test_mutated_server_bytes_either_parse_or_raise_the_remote_error() -> None:
    """Seeded random mutations of a valid handshake and of valid replies, fed whole
    and in random pieces: events, NEED_DATA or NbdProtocolError/NbdRefused; never
    another exception."""
    rng = random.Random(2026)
    good_handshake = handshake(extra=info_block(512, 4096, 1 << 20))
    for i in range(3000):
        conn = NbdClientConnection("disk")
        stream = bytearray(good_handshake)
        tail = bytearray()
        if i % 2:  # mutate transmission replies instead of the handshake
            feed(conn, good_handshake)
            c1 = conn.request(w.Cmd.READ, 4096, 4096)
            c2 = conn.request(w.Cmd.WRITE, 0, payload=b"x" * 512)
            stream = bytearray(data_chunk(c1, 4096, bytes(2048), done=False)
                               + chunk(c1, w.ReplyType.OFFSET_HOLE, (6144).to_bytes(8, "big")
                                       + (2048).to_bytes(4, "big"))
                               + error_chunk(c2, errno.ENOSPC, b"full"))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(stream))
            stream[at] = rng.randrange(256)
        tail += stream
        try:
            while tail:
                n = rng.randrange(1, 64)
                feed(conn, bytes(tail[:n]))
                del tail[:n]
        except (NbdProtocolError, NbdRefused):
            pass
