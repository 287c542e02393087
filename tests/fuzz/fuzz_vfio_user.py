"""Fuzz the vfio-user framing and the sans-I/O server over a real NVMe controller.

Any bytes (cut where the runtime would cut them, a few fds riding along) must
end in replies, or a RemoteProtocolError and a closed connection; never another
exception, a logged traceback, or an fd left open once the connection closed.

    python tests/fuzz/fuzz_vfio_user.py -max_total_time=20 tests/fuzz/corpus/vfio_user
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import common

with common.instrumented(__name__):
    from appliance.config import NamespaceConfig
    from appliance.errors import RemoteProtocolError
    from appliance.storage import NvmeController
    from appliance.storage.migration import NvmeMigratable
    from appliance.vfio_user.migration import VfioUserMigration
    from appliance.vfio_user.server import ServerConnection

_tmp = tempfile.mkdtemp(prefix="fuzz-vfio-user-")
atexit.register(shutil.rmtree, _tmp, True)
CTRL = NvmeController([NamespaceConfig(image=f"{_tmp}/ns1.img", size=1 << 20, block_size=512,
                                       read_only=False, grow=False)], io_queues=2, queue_entries=64)
_migratable = NvmeMigratable(CTRL)
CTRL.migration_handler = (  # type: ignore[attr-defined]
    lambda memory: VfioUserMigration(_migratable, memory, name="nvme"))
MAX_MESSAGES = 64


def _serve(data: bytes) -> None:
    conn = ServerConnection(CTRL, notify=lambda fd: None)
    chunks = common.Chunks(data)
    try:
        for _ in range(MAX_MESSAGES * 4):
            if conn.closed:
                break
            piece = chunks.next(conn.bytes_wanted())
            if piece is None:
                break
            try:
                conn.receive_data(*piece)
            except RemoteProtocolError:
                conn.close()
                break
            conn.process()
            CTRL.poll()
            conn.data_to_send()  # reply fds are the device's own: nothing to close
    finally:
        conn.close()  # it owns every fd it was fed


one_input = common.checked(_serve)

if __name__ == "__main__":
    common.run_fuzzer(one_input)
