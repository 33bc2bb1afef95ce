"""Run a command and report its longest stretch without output (the first-hour issue's check that
a long run is never silent): ``python scripts/longest_silence.py --limit 20 -- CMD ...``.

Prints each output line with the seconds since start, then the longest silence, the total time,
and exits 1 when the silence exceeded ``--limit`` seconds (or the command failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=20.0, help="longest silence allowed (s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command after --")
    start = last = time.monotonic()
    longest, at = 0.0, 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic()
        if now - last > longest:
            longest, at = now - last, last - start
        last = now
        print(f"{now - start:7.1f}  {line.rstrip()}", flush=True)
    code = proc.wait()
    total = time.monotonic() - start
    print(f"longest silence {longest:.1f} s (from {at:.1f} s); total {total:.1f} s; exit {code}")
    return 0 if code == 0 and longest <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
