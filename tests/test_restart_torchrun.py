"""``torchrun --max-restarts``: the restarted group rebuilds its gloo process group.

torchrun's agent keeps one TCPStore across restarts and gloo publishes each rank's address
there under fixed keys, so a restarted rank could read its dead predecessor's address
(``connectFullMesh failed ... Connection refused``). ``launch.dist.init_process_group`` puts
the keys under the restart attempt. Here rank 1 dies in attempt 0 and, in attempt 1, rank 0
joins 1 s late, so with shared keys rank 1 would always read the dead attempt's address for
rank 0 (then fail or hang whenever rank 1 is the side of the pair that dials: 3 of 4 runs
without per-attempt keys). The whole trainer restart (resume, bit-identical weights) is
``test_resume_kill.py::test_torchrun_max_restarts_resumes_bit_identical`` (slow).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as torch_dist

from launch import dist

WORKER = """
import os, signal, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from launch import dist as launch_dist

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 0:
    time.sleep(1.0)  # rank 1 reads rank 0's address first
launch_dist.init_process_group()
total = torch.ones(1)
for step in range(5):
    dist.all_reduce(total)
    if attempt == 0 and rank == 1 and step == 1:
        os.kill(os.getpid(), signal.SIGKILL)
Path(sys.argv[1], f"done-{attempt}-{rank}").write_text(str(int(total.item())))
"""


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_restarted_group_rebuilds_gloo_mesh(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]  # also: no abort while the interpreter shuts down
    # attempt 0 failed (torchrun reports whichever rank it sees first: rank 1's SIGKILL or rank 0's
    # broken all_reduce) and the restarted group connected
    assert ("exitcode: -9" in log or "exitcode: 1" in log) and "connectFullMesh failed" not in log, log[-3000:]
    done = {f.name: f.read_text() for f in tmp_path.glob("done-*")}
    assert done == {"done-1-0": str(2**5), "done-1-1": str(2**5)}, log[-3000:]


@pytest.mark.parametrize(
    ("agent_store", "agents", "warns"), [("True", "2", True), ("False", "2", False), ("False", "1", False)]
)
def test_process_group_left_to_accelerate_unless_one_agent_shares_its_store(
    monkeypatch, caplog, agent_store, agents, warns
):
    """Several agents count restarts apart (no per-attempt keys possible: warn unless torchrun
    gives each attempt a fresh store); without the agent's store there is nothing to namespace."""
    env = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "GROUP_WORLD_SIZE": agents,
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_USE_AGENT_STORE": agent_store,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def no_store(*args: object, **kwargs: object) -> None:
        raise AssertionError("init_process_group connected to the agent's store")

    monkeypatch.setattr(torch_dist, "TCPStore", no_store)
    if torch_dist.is_initialized():  # left by an earlier in-process fit (FSDP and DeepSpeed keep a world-1 group)
        torch_dist.destroy_process_group()
    with caplog.at_level(logging.WARNING, logger="launch.dist"):
        dist.init_process_group()
    assert not torch_dist.is_initialized()
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text) == warns
