"""CheckpointManager on its own: atomic publish, keep-K pruning, partial checkpoints never
loaded, failures agreed across ranks, RNG round trips, compatibility messages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from launch.checkpoint import (
    COMPLETE,
    LATEST,
    TRAINER_FILE,
    CheckpointManager,
    check_compatible,
    fingerprint,
    is_complete,
    load_file,
    nonfinite_keys,
    rank_file,
    rank_state,
    read_meta,
    restore_rank_state,
    rng_state,
    save_file,
    set_rng_state,
)
from launch.errors import CheckpointError


def _writer(value: float, rank: int = 0):
    def write(tmp: Path) -> None:
        if rank == 0:
            save_file({"w": torch.full((3,), value)}, tmp / TRAINER_FILE)
        save_file(rank_state({"position": int(value)}), rank_file(tmp, rank))

    return write


def _manager(tmp_path: Path, keep: int = 2) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=keep, rank=0, agree=lambda ok: ok)
    mgr.prepare()
    return mgr


def test_save_publishes_complete_checkpoint_and_latest_pointer(tmp_path):
    mgr = _manager(tmp_path)
    path = mgr.save(10, _writer(1.0), {"epoch": 0, "reason": "periodic"})
    assert path.name == "step-00000010" and is_complete(path)
    assert (mgr.directory / LATEST).read_text().strip() == "step-00000010"
    meta = read_meta(path)
    assert meta["step"] == 10 and meta["epoch"] == 0 and meta["world_size"] == 1
    assert torch.equal(load_file(path / TRAINER_FILE)["w"], torch.ones(3))
    assert not list(mgr.directory.glob(".tmp-*"))


def test_keep_prunes_oldest_only_after_new_is_complete(tmp_path):
    mgr = _manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, _writer(float(step)))
    assert [p.name for p in mgr.checkpoints()] == ["step-00000002", "step-00000003"]
    assert mgr.latest().name == "step-00000003"


def test_resave_of_same_step_replaces_it(tmp_path):
    mgr = _manager(tmp_path)
    mgr.save(5, _writer(1.0))
    mgr.save(5, _writer(2.0))
    assert len(mgr.checkpoints()) == 1
    assert torch.equal(load_file(mgr.latest() / TRAINER_FILE)["w"], torch.full((3,), 2.0))


def test_partial_checkpoints_are_never_loaded_and_are_cleaned(tmp_path):
    mgr = _manager(tmp_path)
    good = mgr.save(4, _writer(4.0))
    partial = mgr.directory / ".tmp-step-00000008"
    partial.mkdir()
    (partial / TRAINER_FILE).write_bytes(b"truncated")
    no_marker = mgr.directory / "step-00000009"  # e.g. copied by hand without its marker
    no_marker.mkdir()
    assert mgr.resolve("auto") == good
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        mgr.resolve(str(no_marker))
    mgr.prepare()
    assert not partial.exists() and good.exists()


def test_resolve_forms(tmp_path):
    mgr = _manager(tmp_path)
    assert mgr.resolve("auto") is None and mgr.resolve("none") is None
    path = mgr.save(3, _writer(3.0))
    mgr.save(6, _writer(6.0))
    assert mgr.resolve(str(path)) == path
    assert mgr.resolve(str(mgr.directory / LATEST)).name == "step-00000006"
    assert mgr.resolve(str(tmp_path)).name == "step-00000006"  # a run directory
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mgr.resolve(str(tmp_path / "nope"))


def test_failed_write_keeps_earlier_checkpoints(tmp_path):
    mgr = _manager(tmp_path)
    mgr.save(1, _writer(1.0))

    def full_disk(tmp: Path) -> None:
        raise OSError(28, "No space left on device", str(tmp / TRAINER_FILE))

    with pytest.raises(
        CheckpointError, match=r"No space left on device.*earlier checkpoints are intact \(latest: step-00000001\)"
    ):
        mgr.save(2, full_disk)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001"]
    assert not list(mgr.directory.glob(".tmp-*"))


def test_failure_on_another_rank_is_agreed(tmp_path):
    """Rank 0 wrote fine but the ranks' agreement says someone failed: nothing published."""
    votes = iter([True, False])  # tmp dir created everywhere; a write failed elsewhere
    mgr = CheckpointManager(tmp_path / "ck", keep=2, rank=0, agree=lambda ok: ok and next(votes))
    with pytest.raises(CheckpointError, match="failed on another rank"):
        mgr.save(7, _writer(7.0))
    assert mgr.checkpoints() == [] and not list(mgr.directory.glob(".tmp-*"))


def test_unusable_directory_is_one_line_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    mgr = CheckpointManager(blocker / "checkpoints", keep=1, rank=0, agree=lambda ok: ok)
    with pytest.raises(CheckpointError, match=r"cannot use checkpoint directory .*Not a directory") as err:
        mgr.prepare()
    assert "\n" not in str(err.value)


def test_torch_save_error_is_the_os_error(tmp_path):
    """A file-size limit makes torch's writer fail; we report the OSError, not 'unexpected pos'."""
    code = textwrap.dedent(f"""
        import resource, torch
        from launch.checkpoint import save_file
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_file({{"w": torch.zeros(10000)}}, __import__("pathlib").Path({str(tmp_path / "x.pt")!r}))
        except OSError as err:
            print("OSError", err.strerror)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "OSError File too large"


def test_kill_inside_publish_leaves_previous_checkpoint(tmp_path):
    """SIGKILL after the files are written, before the marker: the next start loads the previous one."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from launch import checkpoint as ck
        mgr = ck.CheckpointManager(Path({str(tmp_path)!r}), keep=2, rank=0, agree=lambda ok: ok)
        mgr.prepare()
        write = lambda tmp: ck.save_file({{"w": torch.ones(2)}}, tmp / ck.TRAINER_FILE)
        mgr.save(1, write)
        ck.manager.fileio.write_synced = lambda path, text: os.kill(os.getpid(), signal.SIGKILL)
        mgr.save(2, write)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / ".tmp-step-00000002" / TRAINER_FILE).exists()  # written, never published
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, agree=lambda ok: ok)
    assert mgr.resolve("auto").name == "step-00000001"
    mgr.prepare()
    assert not (tmp_path / ".tmp-step-00000002").exists()


def test_rng_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_file(rank_state({"pos": 5}), rank_file(tmp_path, 0))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert restore_rank_state(tmp_path, 0) == {"pos": 5}
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    state = rng_state()
    first = (random.random(), np.random.randn(), torch.randn(3))
    set_rng_state(state)
    again = (random.random(), np.random.randn(), torch.randn(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


class Tiny(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 4)


def test_incompatible_checkpoint_names_the_difference(tmp_path):
    saved = fingerprint(Tiny(192), {"model": {"embed_dim": 192, "depth": 12}, "world_size": 2})
    current = fingerprint(Tiny(128), {"model": {"embed_dim": 128, "depth": 12}, "world_size": 2})
    with pytest.raises(CheckpointError) as err:
        check_compatible(tmp_path, saved, current)
    msg = str(err.value)
    assert msg.index("checkpoint has model.embed_dim=192, this run has 128") < msg.index("shape of proj.weight")
    assert "trainer.checkpoint.weights_only=" in msg and "\n" not in msg
    check_compatible(tmp_path, saved, dict(saved))


def test_fingerprint_uses_full_zero3_shapes():
    model = Tiny(8)
    model.proj.weight.ds_shape = torch.Size([4, 8])
    model.proj.weight.data = torch.empty(0)  # ZeRO-3 keeps only a local shard
    assert fingerprint(model)["shape of proj.weight"] == [4, 8]


def test_nonfinite_keys():
    state = {
        "model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
        "optimizers": [{"state": {0: {"exp_avg": torch.tensor([float("inf")]), "step": torch.tensor(3)}}}],
    }
    assert nonfinite_keys(state) == ["model.b", "optimizers.0.state.0.exp_avg"]


def test_meta_is_plain_json(tmp_path):
    mgr = _manager(tmp_path)
    path = mgr.save(1, _writer(1.0), {"fingerprint": fingerprint(Tiny(4))})
    assert json.loads((path / "meta.json").read_text())["fingerprint"]["task"] == "Tiny"
    assert (path / COMPLETE).read_text().strip() == path.name
    assert os.listdir(path) and rank_file(path, 0).exists()


def test_weights_only_from_checkpoint_file_and_safetensors(tmp_path):
    from safetensors.torch import save_file as save_safetensors

    from launch.checkpoint import load_weights

    src = Tiny(8)
    mgr = _manager(tmp_path)
    mgr.save(3, lambda tmp: save_file({"model": src.state_dict(), "step": 3}, tmp / TRAINER_FILE))
    for source in (tmp_path, mgr.latest()):
        dst = Tiny(8)
        assert load_weights(dst, source) == ([], [])
        assert torch.equal(dst.proj.weight, src.proj.weight)
    save_safetensors(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    for name in ("w.safetensors", "official.pth"):
        dst = Tiny(8)
        load_weights(dst, tmp_path / name)
        assert torch.equal(dst.proj.bias, src.proj.bias)
    with pytest.raises(CheckpointError, match=r"proj.weight has shape \[4, 8\] there, \[4, 16\] in this model"):
        load_weights(Tiny(16), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="weights_only=.*no such file"):
        load_weights(Tiny(8), tmp_path / "nope.pt")
