"""Hostile checkpoint files (issue 20, item 12): a checkpoint that is a raw pickle is named
for what it is and never unpickled; torch's advice to load it unsafely and its raw warnings
never reach the user."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from builders.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cli.main import app

runner = CliRunner()


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _raw(path, obj, protocol):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_raw_pickle_is_not_an_avi_checkpoint_and_is_not_loaded(tmp_path, protocol):
    marker = tmp_path / "code-ran"
    path = _raw(tmp_path / "last.pt", {"format": "avi-checkpoint", "x": _CreatesFile(marker)}, protocol)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(e.value)
    assert "weights_only" not in message and "trusted source" not in message
    if protocol >= 2:
        assert "is not an avi checkpoint" in message and "raw Python pickle" in message


@pytest.mark.parametrize("protocol", [1, 4])
def test_eval_of_a_raw_pickle_says_why_it_was_not_loaded(tmp_path, protocol):
    path = _raw(tmp_path / "model.pt", {"format": "avi-checkpoint", "model": {"w": [1.0, 2.0]}}, protocol)
    r = runner.invoke(app, ["eval", str(path), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "is not an avi checkpoint" in r.stderr and "raw Python pickle" in r.stderr
    assert "not loaded" in r.stderr
    for noise in ("weights_only", "Warning", "Traceback", "trusted source"):
        assert noise not in r.output, r.output


def test_a_legacy_torch_save_file_is_named_as_such(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="before PyTorch 1.6"):
        load_checkpoint(path)


def test_damage_is_still_called_corrupt_and_a_fifo_not_a_regular_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is corrupt") as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(fifo)


# ------------------------------------------ a checkpoint larger than this machine's memory

def _small_memory(monkeypatch, free: int) -> None:
    import builders.network.size as size
    monkeypatch.setattr(size, "available_memory", lambda device: free)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))


def test_a_checkpoint_larger_than_free_memory_is_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(250_000)}})       # 1 MB of tensors
    assert load_checkpoint(path)["model"]["w"].shape == (250_000,)    # this machine: it fits
    _small_memory(monkeypatch, 500_000)
    with pytest.raises(CheckpointError, match=r"was not loaded: its tensors take 1 MB and this "
                                              r"machine has 500 KB of memory free"):
        load_checkpoint(path)
    r = runner.invoke(app, ["eval", str(path), "--device", "cpu"])
    assert r.exit_code == 2 and "500 KB of memory free" in r.stderr, r.output
    assert "Traceback" not in r.output


def test_a_small_archive_unpacking_to_more_than_free_memory_is_refused(tmp_path, monkeypatch):
    """A 100 KB file whose deflated entry unpacks to 64 MB (the directory declares it): judged
    by what it unpacks to, not by its size on disk."""
    import zipfile
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("last/data/bomb", bytes(64 << 20))
    assert path.stat().st_size < 200_000
    _small_memory(monkeypatch, 32 << 20)
    with pytest.raises(CheckpointError, match=r"its tensors take 67.\d MB .* 33.\d MB of memory free"):
        load_checkpoint(path)
