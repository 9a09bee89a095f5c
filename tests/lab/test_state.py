"""The lab's bookkeeping: manifests survive a round trip, PIDs are recognised by start time,
process trees are found (fast, no root needed)."""

import os
import subprocess
import sys

from flatnet.lab.state import (
    LabState,
    ProcessRecord,
    mounts_under,
    process_start_ticks,
    terminate,
    with_descendants,
)


def test_manifest_round_trips_and_a_torn_one_reads_as_none(tmp_path):
    state = LabState("t1", root=tmp_path)
    manifest = state.create()
    manifest.namespaces.append("t1-lan")
    manifest.processes.append(ProcessRecord("app:web", 123, 456, "wsl1", ["x"], "/tmp/log"))
    manifest.notes.append("a note")
    manifest.facts["gateway"] = {"mode": "static"}
    state.save(manifest)
    assert state.load() == manifest
    state.manifest_path.write_text("{ torn")
    assert state.load() is None
    state.remove()
    assert not state.dir.exists()
    state.remove()  # idempotent


def test_a_record_is_alive_only_while_pid_and_start_time_match():
    me = os.getpid()
    ticks = process_start_ticks(me)
    assert ticks is not None
    assert ProcessRecord("me", me, ticks, "h", [], "").alive()
    assert not ProcessRecord("recycled", me, ticks + 1, "h", [], "").alive()
    assert process_start_ticks(2**22 + 12345) is None


def test_with_descendants_finds_grandchildren_and_terminate_ends_them():
    shell = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; "
                              "p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); "
                              "print(p.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(shell.stdout.readline())
        tree = with_descendants([shell.pid])
        assert tree[0] == shell.pid and grandchild in tree
        terminate(tree, grace=2.0)
        assert process_start_ticks(grandchild) is None
    finally:
        shell.kill()
        shell.wait()
        shell.stdout.close()


def test_mounts_under_sees_nothing_in_a_plain_directory(tmp_path):
    assert mounts_under(tmp_path) == []
