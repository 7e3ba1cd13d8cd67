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



def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (UTS namespaces)")
def test_embed_on_two_hosts_with_their_own_checkouts_equals_one_process(tmp_path):
    """`accelerate launch --num_machines 2` of `digiq embed`: host A (rank 0) and host B (rank 1, its own hostname)
    each run in their own working directory holding their own copy of the inputs (as after `dvc pull`), with
    relative paths; only the chunk parts go to a folder both see. A's tables equal a one-process run's; B writes
    nothing of its own."""
    import pyarrow.parquet as pq
    import yaml
    from test_candidates import write_tiny_dataset
    from tiny_llava import save_tiny_llava

    from digiq import candidates as C
    from digiq import embed as E
    from digiq.config import EmbedParams, Params
    from digiq.pipelines import embed as stage

    a, b, shared = tmp_path / "host-a", tmp_path / "host-b", tmp_path / "shared"
    dataset = write_tiny_dataset(a / "data" / "raw", n_traj=2, steps=3)  # 6 states, 3 chunks of 2
    C.write_candidates(C.make_candidates(dataset, 4, seed=0), a / "data" / "candidates.parquet")
    save_tiny_llava(a / "models" / "tiny")
    shutil.copytree(a, b)  # B's checkout: the same inputs at the same relative paths
    section = {"models": {"finetuned": "models/tiny"}, "candidates": "data/candidates.parquet", "out": "data/emb",
               "metrics": "metrics", "dtype": "float32", "device": "cpu", "chunk_states": 2}
    one = tmp_path / "one"
    shutil.copytree(a, one)
    cwd = os.getcwd()
    os.chdir(one)
    try:
        stage.run(Params(collect={"out": "data/raw"}, embed=EmbedParams(**section, parts="parts")))
    finally:
        os.chdir(cwd)
    for host in (a, b):
        (host / "params.yaml").write_text(yaml.safe_dump({"collect": {"out": "data/raw"},
                                                          "embed": {**section, "parts": str(shared / "parts")}}))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    port = free_port()

    def launch(rank: int, cwd: Path, host: str) -> subprocess.Popen:
        argv = [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                "--dynamo_backend", "no", "-m", "digiq.cli.main", "embed", "--params", "params.yaml"]
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$0" "$@"', *argv]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [launch(0, a, "hosta"), launch(1, b, "hostb")]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for table in (E.STATES_FILE, E.CANDIDATES_FILE):
        expected = pq.read_table(one / "data" / "emb" / "finetuned" / table)
        assert expected.num_rows > 0 and pq.read_table(a / "data" / "emb" / "finetuned" / table).equals(expected), table
    assert not (b / "data" / "emb").exists() and not (shared / "parts" / "finetuned").exists()
    assert not list(tmp_path.rglob(".*.tmp"))
