"""`python bench/peak_rss.py OUT_FILE CMD...`: run CMD, then write its peak RSS (KiB) to OUT_FILE; exit as CMD did.

Why a separate launcher: a child's ru_maxrss starts from the resident set of the
process it was forked from (Linux keeps the high-water mark across exec), so a
stage started straight from the benchmark process, which holds torch and the
benchmark models, would report at least the benchmark's own ~0.9 GiB. This
script is a fresh interpreter of a few MiB: what it forks is measured from there.
Run as a script, not `-m bench...`, so nothing heavy is imported first.
"""
import os
import subprocess
import sys

if __name__ == "__main__":
    out, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of CMD and its waited-for descendants
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    with open(out, "w") as f:
        f.write(str(usage.ru_maxrss))  # KiB on Linux
    sys.exit(proc.returncode)
