"""Run ``appliance run`` under cProfile (benchmarks/nvme.py with APPLIANCE_BENCH_PROFILE).

    python benchmarks/profile_run.py OUT.prof PYTHON -m appliance run -c CONFIG ...

The arguments after OUT.prof are the command ``ApplianceProcess`` would run
(its ``wrapper`` puts this script in front); the appliance runs in this
interpreter with the profiler on, and on SIGTERM (``ApplianceProcess.stop``)
its loop ends and the statistics go to OUT.prof, for ``python -m pstats``.
"""

from __future__ import annotations

import cProfile
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[2:4] != ["-m", "appliance"]:
        print(__doc__, file=sys.stderr)
        return 2
    from appliance.cli import main as appliance_main

    profile = cProfile.Profile()
    profile.enable()
    try:
        return appliance_main(argv[4:])
    finally:
        profile.disable()
        profile.dump_stats(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
