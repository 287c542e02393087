"""What a failed test's report shows about the appliances and guests it used.

The pytest plugin records every appliance and guest a test touched
(:func:`track`); when the test fails, :func:`sections` gives one report
section per non-empty source: each appliance's log tail (the INFO log in its
run directory, then what it printed on stderr), its fault rules and counters
(``fault-list`` over the control socket, while it still runs) and each
guest's console tail.  Empty files are left out, never named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

#: the appliances (ApplianceProcess) and guests (Guest) an item used
USED_KEY = pytest.StashKey[list[Any]]()
#: one more guest a test's own fixture started (``item.stash[GUEST_KEY] = guest``)
GUEST_KEY = pytest.StashKey[Any]()


def track(item: pytest.Item, thing: Any) -> None:
    """Record ``thing`` (an ApplianceProcess or a Guest) as used by ``item``."""
    used = item.stash.setdefault(USED_KEY, [])
    if thing not in used:
        used.append(thing)


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of ``path``; "" when missing or empty."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 200 * lines))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _faults(proc: Any) -> str:
    """The appliance's ``fault-list`` as JSON; "" when it cannot answer."""
    from appliance.runtime.control_client import ControlClient

    if not proc.alive:
        return ""
    try:
        with ControlClient(proc.config.control.socket, timeout=2.0) as client:
            return json.dumps(client("fault-list"), indent=1, sort_keys=True)
    except Exception:  # noqa: BLE001 (a report must not fail on a dying appliance)
        return ""


def sections(item: pytest.Item, lines: int) -> list[tuple[str, str]]:
    """The report sections of a failed ``item``: (title, text) pairs."""
    from appliance.testing.process import ApplianceProcess

    out: list[tuple[str, str]] = []
    stored: list[Any] = item.stash.get(USED_KEY, [])
    used = list(stored)
    extra = item.stash.get(GUEST_KEY, None)
    if extra is not None and extra not in used:
        used.append(extra)
    for n, thing in enumerate(used):
        if isinstance(thing, ApplianceProcess):
            name = f"appliance {n}" if n else "appliance"
            for label, path in (("log", thing.run_log_path), ("stderr", thing.log_path)):
                text = _tail(path, lines)
                if text.strip():
                    out.append((f"{name} {label} (last {lines} lines of {path})", text))
            faults = _faults(thing)
            if faults:
                out.append((f"{name} faults (fault-list)", faults))
        elif getattr(thing, "proc", None) is not None:
            text = thing.tail(lines)
            if text.strip():
                name = getattr(thing, "name", "guest")
                out.append((f"{name} console (last {lines} lines of {thing.log_path})", text))
    return out
