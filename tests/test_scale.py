"""Several hosts sharing a folder: atomic writes' temporary names carry the host, and a writer judges only its own
host's leftovers by process id (another host's by age). The second "host" is a process in its own UTS namespace
(`unshare --uts`, its own hostname) with its own working directory, on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digiq.atomic import FOREIGN_STALE_S, atomic_path, host_tag, remove_stale_temps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_carry_pid_and_host(tmp_path):
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        owner = tmp.parent.name[len(".out.json."):].split(".", 1)[0]
        assert owner == f"{os.getpid()}@{host_tag()}" and "." not in host_tag()
        tmp.write_text("x")
    assert target.read_text() == "x" and not list(tmp_path.glob(".*.tmp"))


def test_only_this_hosts_dead_writers_are_judged_by_pid(tmp_path):
    target = tmp_path / "out.json"
    gone = dead_pid()
    mine_dead = tmp_path / f".out.json.{gone}@{host_tag()}.a1.tmp"
    mine_alive = tmp_path / f".out.json.{os.getpid()}@{host_tag()}.a2.tmp"
    legacy_dead = tmp_path / f".out.json.{gone}.a3.tmp"  # written before names carried the host: this host's
    foreign = tmp_path / f".out.json.{gone}@otherhost.a4.tmp"  # pid {gone} means nothing here
    foreign_old = tmp_path / f".out.json.{os.getpid()}@otherhost.a5.tmp"
    for path in (mine_dead, mine_alive, legacy_dead, foreign, foreign_old):
        path.mkdir()
    day_ago = time.time() - FOREIGN_STALE_S - 60
    os.utime(foreign_old, (day_ago, day_ago))
    assert sorted(remove_stale_temps(target)) == sorted([mine_dead, legacy_dead, foreign_old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine_alive.name, foreign.name])


HOST_WRITE = """
import sys, time
from digiq.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text(sys.argv[2])
    if sys.argv[2] == "hang":
        print("writing", flush=True)
        time.sleep(600)
"""


def on_host(host: str, cwd: Path, *args: str, wait: bool = True):
    """``python HOST_WRITE ARGS`` on the host ``host``: its own hostname (a UTS namespace) and working directory."""
    command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$0" "$@"', sys.executable, "-c", HOST_WRITE, *args]
    if wait:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=True)
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (UTS namespaces)")
def test_two_hosts_sharing_a_folder_each_clean_only_their_own_leftovers(tmp_path):
    shared, a, b = tmp_path / "shared", tmp_path / "host-a", tmp_path / "host-b"
    for folder in (shared, a, b):
        folder.mkdir()
    target = shared / "result.txt"
    killed = on_host("hostb", b, str(target), "hang", wait=False)  # host B dies mid-write
    assert killed.stdout.readline().strip() == "writing"
    killed.kill()
    killed.wait()
    left = list(shared.glob(".result.txt.*@hostb.*.tmp"))
    assert len(left) == 1
    on_host("hosta", a, str(target), "from A")  # host A cannot tell whether B's writer runs: it keeps B's temporary
    assert target.read_text() == "from A" and list(shared.glob(".*.tmp")) == left
    on_host("hostb", b, str(target), "from B")  # host B's next write sees its writer is gone and removes it
    assert target.read_text() == "from B" and not list(shared.glob(".*.tmp"))

