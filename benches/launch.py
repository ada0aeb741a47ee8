#!/usr/bin/env python
"""Run CMD, wait for it, and write ITS OWN resource usage (wait4) as JSON to RUSAGE_FILE.

    python benches/launch.py RUSAGE_FILE -- CMD [ARG...]

Why a launcher: Linux seeds a new program's `ru_maxrss` with the high-water RSS of the process it was forked
from (exec records the old mm's peak), so a command started straight from the harness (which has torch loaded)
would report at least the harness's own RSS. Started from this small process instead, the inherited floor is this
launcher's few MiB. Exit status: CMD's own (128 + signal when it was killed by one, like a shell).
"""
import json
import os
import resource
import sys


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, cmd = sys.argv[1], sys.argv[3:]
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    while True:
        try:
            _, status, ru = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"exit_code": code, "ru_utime": ru.ru_utime, "ru_stime": ru.ru_stime,
                   "ru_maxrss_kib": ru.ru_maxrss, "ru_majflt": ru.ru_majflt, "ru_minflt": ru.ru_minflt,
                   "ru_inblock": ru.ru_inblock, "ru_oublock": ru.ru_oublock,
                   "launcher_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
