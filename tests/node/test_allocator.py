"""The allocator tuning: buffers of the receive path's size reuse freed memory instead of faulting
in fresh pages each time (checked in a child process, so the test process stays untouched)."""

from __future__ import annotations

import subprocess
import sys

CYCLE = """
import sys
from flatnet.node.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def minflt():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
keep = [bytes(200_000)]  # something below, so the top of the heap is what gets freed
before = minflt()
for _ in range(500):  # a burst of TUN writes: several large frames alive at once, then freed
    frames = []
    for _ in range(8):
        buf = bytearray(65_000)
        buf[::4096] = b"x" * len(buf[::4096])  # touch every page, as a received packet fills it
        frames.append(bytes(10) + buf)  # the frame: header + packet
    del frames, buf
print(minflt() - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CYCLE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_fresh_pages():
    default, tuned = faults("default"), faults("tuned")
    assert default > 10_000  # glibc's defaults: pages given back and faulted in again, cycle after cycle
    assert tuned < default // 20
