"""The harness itself: namespaces really work and the leak snapshot really sees leaks."""

import subprocess

from flatnet.testing.leaks import Snapshot
from flatnet.testing.markers import needs_root


@needs_root
def test_veth_between_namespaces(netns_factory):
    from flatnet.netns import veth

    a, b = netns_factory("a"), netns_factory("b")
    veth(a, "eth0", b, "eth0")
    a.add_address("eth0", "10.99.0.1/24")
    b.add_address("eth0", "10.99.0.2/24")
    assert a.run(["ping", "-c1", "-W2", "10.99.0.2"], check=False).returncode == 0


def test_snapshot_sees_leaked_process_and_fd():
    before = Snapshot.take("fnt-none")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        problems = Snapshot.take("fnt-none").leaks_since(before, grace=0)
        assert any("sleep 30" in p for p in problems)
        assert any("file descriptor" not in p for p in problems)
    finally:
        proc.kill()
        proc.wait()
    import os

    r, w = os.pipe()
    try:
        problems = Snapshot.take("fnt-none").leaks_since(before, grace=0)
        assert any("file descriptor leaked" in p for p in problems)
    finally:
        os.close(r)
        os.close(w)
    # Once cleaned up, nothing is reported (with the usual grace: in a full run other tests' helper
    # threads may open and close a descriptor at that very moment).
    assert Snapshot.take("fnt-none").leaks_since(before) == []
