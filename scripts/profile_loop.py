"""Runs a script with the engine loop thread under cProfile; prints the top functions by own
time and by cumulative time when the script exits (where a step's host time goes).

    python scripts/profile_loop.py scripts/gpu_spec_bench.py --scales 16 [...]

Host time spent waiting for the GPU shows up in the call that synchronises (`tolist`, `item`,
`synchronize`, event waits). Writes the stats to $OUT/loop_profile.txt as well.
"""

from __future__ import annotations

import atexit
import cProfile
import io
import os
import pstats
import runpy
import sys
from pathlib import Path

from repo_path import expose_repo


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    expose_repo()
    from rollout_accel.serving.engine import engine_loop

    profiles: list[cProfile.Profile] = []
    original = engine_loop.EngineLoop._run

    def profiled(self: engine_loop.EngineLoop) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    engine_loop.EngineLoop._run = profiled  # type: ignore[method-assign]

    def report() -> None:
        if not profiles:
            return
        text = io.StringIO()
        stats = pstats.Stats(profiles[0], stream=text)
        for extra in profiles[1:]:
            stats.add(extra)
        stats.sort_stats("tottime").print_stats(int(os.environ.get("PROFILE_TOP", "25")))
        stats.sort_stats("cumulative").print_stats(int(os.environ.get("PROFILE_TOP", "25")))
        out = text.getvalue()
        Path(os.environ.get("OUT", "."), "loop_profile.txt").write_text(out)
        print(out[-12000:])

    atexit.register(report)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
