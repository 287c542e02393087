"""Type stub of the C extension built from native/fastpath/ (see appliance/net/native.py)."""

import mmap

from appliance.memory import MappedRegions
from appliance.net.native import NativeChain, NativeRegions, NativeSwitchOut, NativeTarget
from appliance.storage.native_io import NativeNamespaces, NativeOutcome

def pop_chains(desc: memoryview, avail: memoryview, used: memoryview, regions: NativeRegions,
               size: int, last_avail_idx: int, used_idx: int, indirect: bool, max_readable: int,
               max_writable: int, budget: int, /,
               ) -> tuple[list[NativeChain], int, int, int, str | None, str | None]: ...
def drain(desc: memoryview, avail: memoryview, used: memoryview, regions: NativeRegions,
          size: int, last_avail_idx: int, used_idx: int, indirect: bool, max_readable: int,
          max_writable: int, budget: int, /,
          ) -> tuple[list[bytes], int, int, int, str | None, str | None]: ...
def guard_sigbus() -> bool: ...
def publish(avail: memoryview, used: memoryview, size: int, published: int, used_idx: int,
            event_idx: bool, /) -> bool: ...
def nvme_run(regions: MappedRegions, sq: tuple[int, int, int, int],
             cq: tuple[int, int, int, int, int], sqid: int, budget: int,
             namespaces: NativeNamespaces, mdts: int, nowait: bool, write_cache: bool,
             guest_marks: bool, /) -> NativeOutcome: ...
def nvme_poll(page: mmap.mmap, seen: bytearray, plan: tuple[object, ...], /,
              ) -> tuple[bool, int, int, int, int, int, list[tuple[int, int, int]]] | bool | None: ...
def receive(desc: memoryview, avail: memoryview, used: memoryview, regions: NativeRegions,
            size: int, last_avail_idx: int, used_idx: int, indirect: bool, max_readable: int,
            max_writable: int, frame: bytes, hdr_len: int, mrg: bool,
            log: bytearray | mmap.mmap | None, /,
            ) -> tuple[int, int, int, int, str | None, str | None, int]: ...
def nvme_loadgen(memory: memoryview, memory_base: int,
                 queue: tuple[int, int, int, int, int, int, int], doorbells: memoryview | None,
                 sock_fd: int, msg_id: int, irq_fd: int,
                 io: tuple[int, int, int, int, int, int, int, int],
                 limits: tuple[int, float], /) -> dict[str, float]: ...
def switch_tx(desc: memoryview, avail: memoryview, used: memoryview, regions: NativeRegions,
              size: int, last_avail_idx: int, used_idx: int, indirect: bool, max_readable: int,
              max_writable: int, budget: int, hdr_len: int, enabled: bool, src: int,
              table: bytes, ports: tuple[NativeTarget, ...], /) -> NativeSwitchOut: ...
def switch_frames(pending: bytes, offset: int, src: int, table: bytes,
                  ports: tuple[NativeTarget, ...], /) -> NativeSwitchOut: ...
