"""Checkpoint integrity (issue #14, case 2): damaged bytes of the same size never load silently.

Every save writes ``checksums.json`` (size and CRC-32 of every file) inside ``iter_N.tmp/`` before
it is published; resume, ``load_model_weights`` and the HF export verify it before any weights are
used, and a mismatch is a CheckpointError naming the file. A damaged ``.metadata`` (which used to
end in a raw ``CheckpointException``, a BaseException) is named too; ``latest`` never moves.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
ITER = "iter_0000001"


def _overrides(corpus, run_dir):
    return [
        "model.preset=test",
        "model.normalization=ssnorm",
        "model.embedding_projection=true",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"data.cache_dir={corpus}_index_cache",
        "optimizer.name=adam",
        "train.train_steps=2",
        "train.warmup_steps=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.eval_batches=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]


def _xor_middle(path: Path, n: int = 256) -> None:
    """The issue's damage: XOR ``n`` bytes in the middle of the file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(max(0, mid - n // 2), min(len(data), mid + n // 2)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace_once(path: Path, old: bytes, new: bytes, last: bool = False) -> None:
    """A same-size edit that keeps the file well-formed (a pickle, YAML or JSON that still parses)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    i = data.rindex(old) if last else data.index(old)
    path.write_bytes(data[:i] + new + data[i + len(old):])


# The weight's entry in the pickled shard index's storage_data (its last mention): renamed, the
# index still unpickles, but no longer says where output_layer.weight is stored.
_RENAME_IN_INDEX = (b"\x13output_layer.weight", b"\x13output_layer.weighu")


# ------------------------------------------------------------------ the saved run (one process)
def _train_and_save_worker(rank, world, corpus, run_dir):
    """One step of a run, saved at exit_at_step=1; records what iter_N.tmp holds when it is published."""
    from megatron_osp.training import checkpoint
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    seen = []
    real_publish = checkpoint._publish

    def publish(tmp, final, save_dir):
        manifest = tmp / "checksums.json"
        listed = sorted(json.loads(manifest.read_text())["files"]) if manifest.exists() else None
        seen.append((tmp.name, sorted(p.name for p in tmp.iterdir()), listed))
        real_publish(tmp, final, save_dir)

    checkpoint._publish = publish
    trainer = Trainer(load_config(None, _overrides(corpus, run_dir) + ["train.exit_at_step=1"]), log=lambda *_: None)
    trainer.train()
    return {"seen": seen, "params": {k: v.detach().clone() for k, v in unwrap(trainer.model).named_parameters()}}


@pytest.fixture(scope="module")
def saved(toy_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    out = run_distributed(_train_and_save_worker, 1, toy_corpus, str(root / "run"))[0]
    return root / "run", out, toy_corpus


def _copy_run(saved, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved[0], run)
    return run


def _env():
    return dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_every_save_publishes_a_complete_manifest(saved):
    """checksums.json is in iter_N.tmp before it is renamed and latest moves, and lists every file."""
    seen = saved[1]["seen"]
    assert len(seen) == 1 and seen[0][0] == f"{ITER}.tmp"
    _, at_publish, listed = seen[0]
    assert "checksums.json" in at_publish
    assert listed == [name for name in at_publish if name != "checksums.json"]
    for name in (".metadata", "common.pt", "metadata.json", "run_config.yaml", "train_state.json"):
        assert name in listed
    assert any(name.endswith(".distcp") for name in listed)
    from megatron_osp.training.checkpoint_integrity import verify_checkpoint

    verify_checkpoint(saved[0] / "checkpoints" / ITER)  # the published files match it


# ------------------------------------------------------------------ the operation: resume
def test_resume_from_a_damaged_shard_stops_naming_the_file(saved, tmp_path):
    """XOR 256 bytes in the middle of iter_N/__0_0.distcp and rerun the same command."""
    run = _copy_run(saved, tmp_path)
    save_dir = run / "checkpoints"
    shard = save_dir / ITER / "__0_0.distcp"
    _xor_middle(shard)
    before = sorted(p.name for p in save_dir.iterdir())
    cmd = [sys.executable, "-m", "megatron_osp.training.pretrain", *_overrides(saved[2], run)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(shard) in proc.stderr and "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The run stopped before training: no new save, latest still on the last good save.
    assert (save_dir / "latest").read_text().strip() == ITER
    assert sorted(p.name for p in save_dir.iterdir()) == before


# ------------------------------------------------------------------ export path
def test_load_model_weights_refuses_damaged_files_and_loads_good_ones_bit_exactly(saved, tmp_path, megatron_single_rank):
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import CheckpointError, load_model_weights, model_config_for_one_process

    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    ckpt = save_dir / ITER
    mc = model_config_for_one_process(save_dir)
    model = build_gpt_model(mc, transformer_config(mc), seed=77)
    load_model_weights(save_dir, [model])
    expected = saved[1]["params"]
    assert {k: torch.equal(v, expected[k]) for k, v in model.named_parameters()} == {k: True for k in expected}

    pristine = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    fresh = build_gpt_model(mc, transformer_config(mc), seed=78)
    before = [p.detach().clone() for p in fresh.parameters()]
    for name in sorted(n for n in pristine if n.endswith(".distcp")) + [".metadata", "common.pt"]:
        _xor_middle(ckpt / name)
        with pytest.raises(CheckpointError, match=f"{ckpt / name} is damaged"):
            load_model_weights(save_dir, [fresh])
        (ckpt / name).write_bytes(pristine[name])
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), before))  # nothing was loaded


def test_convert_to_hf_refuses_a_damaged_shard_and_writes_nothing(saved, tmp_path):
    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    shard = save_dir / ITER / "__0_0.distcp"
    _xor_middle(shard)
    out = tmp_path / "hf"
    cmd = [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), str(save_dir), str(out)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert str(shard) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no partial or temporary output either


# ------------------------------------------------------------------ .metadata and the small files
def test_damaged_metadata_is_named_not_a_raw_checkpoint_exception(saved, tmp_path, megatron_single_rank):
    """Two same-size damages of the shard index: one letter of a tensor name (still a valid pickle:
    dist_checkpointing used to fail with a bare CheckpointException naming no file), 256 XORed bytes."""
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import CheckpointError, load_model_weights, model_config_for_one_process

    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    index = save_dir / ITER / ".metadata"
    pristine = index.read_bytes()
    mc = model_config_for_one_process(save_dir)
    model = build_gpt_model(mc, transformer_config(mc), seed=77)
    for damage in (lambda: _replace_once(index, *_RENAME_IN_INDEX, last=True), lambda: _xor_middle(index)):
        damage()
        assert len(index.read_bytes()) == len(pristine)
        with pytest.raises(CheckpointError, match=f"{index}"):
            load_model_weights(save_dir, [model])
        index.write_bytes(pristine)


def test_a_load_failure_inside_dist_checkpointing_names_the_checkpoint_and_file(saved, tmp_path, megatron_single_rank, capsys):
    """A damaged index whose manifest was rewritten afterwards (the user vouched for the files):
    dist_checkpointing's CheckpointException (a BaseException) becomes a CheckpointError."""
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import CheckpointError, load_model_weights, model_config_for_one_process
    from megatron_osp.training.checkpoint_integrity import main as integrity_main

    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    ckpt = save_dir / ITER
    _replace_once(ckpt / ".metadata", *_RENAME_IN_INDEX, last=True)
    assert integrity_main(["write", str(save_dir)]) == 0
    assert "files that differ from the old manifest: .metadata" in capsys.readouterr().out
    mc = model_config_for_one_process(save_dir)
    model = build_gpt_model(mc, transformer_config(mc), seed=77)
    with pytest.raises(CheckpointError, match=rf"loading checkpoint {ckpt} failed reading {ckpt / '.metadata'}.*KeyError"):
        load_model_weights(save_dir, [model])


@pytest.mark.parametrize(
    "name, edit",
    [
        ("common.pt", None),
        ("run_config.yaml", None),
        ("run_config.yaml", (b"hidden_size: 64", b"hidden_size: 65")),  # still valid YAML
        ("train_state.json", None),
        ("train_state.json", (b'"consumed_samples": 4', b'"consumed_samples": 9')),  # still valid JSON
    ],
)
def test_damaged_small_files_are_named_when_the_checkpoint_is_opened(saved, tmp_path, name, edit):
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, read_train_state

    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    path = save_dir / ITER / name
    _xor_middle(path) if edit is None else _replace_once(path, *edit)
    for open_it in (read_train_state, read_run_config):
        with pytest.raises(CheckpointError, match=f"{path} is damaged"):
            open_it(save_dir)


# ------------------------------------------------------------------ manifests: missing, damaged, CLI
def test_missing_or_damaged_manifest_is_refused_with_the_way_out(saved, tmp_path, capsys):
    from megatron_osp.training.checkpoint import CheckpointError, resolve_checkpoint
    from megatron_osp.training.checkpoint_integrity import main as integrity_main

    save_dir = _copy_run(saved, tmp_path) / "checkpoints"
    manifest = save_dir / ITER / "checksums.json"
    assert integrity_main(["verify", str(save_dir)]) == 0
    text = manifest.read_text()
    manifest.write_text(text.replace('"size": 2', '"size": 3', 1))  # an edit to the manifest itself
    with pytest.raises(CheckpointError, match=f"{manifest}: damaged checksum manifest"):
        resolve_checkpoint(save_dir)
    manifest.unlink()  # a checkpoint saved before manifests existed
    with pytest.raises(CheckpointError, match=f"{save_dir / ITER} has no checksum manifest checksums.json.*"
                       "checkpoint_integrity write"):
        resolve_checkpoint(save_dir)
    assert integrity_main(["verify", str(save_dir)]) == 2
    assert "no checksum manifest" in capsys.readouterr().err
    assert integrity_main(["write", str(save_dir)]) == 0
    assert json.loads(manifest.read_text()) == json.loads(text)  # the same files give the same manifest
    assert resolve_checkpoint(save_dir) == save_dir / ITER


# ------------------------------------------------------------------ two ranks
def _two_rank_worker(rank, world, root):
    """TP=2: save (each rank hashes its own shard), damage rank 1's shard, load on both ranks."""
    import torch.distributed as dist

    from megatron_osp import parallel, platform
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.models.presets import get_preset
    from megatron_osp.training.checkpoint import CheckpointError, load_model_weights, save_checkpoint
    from megatron_osp.training.config import ParallelSettings, RunConfig

    parallel.init_distributed(2, 1)
    platform.seed_everything(0)
    mc = get_preset("test")
    model = build_gpt_model(mc, transformer_config(mc, tensor_parallel_size=2), seed=5)
    ckpt = save_checkpoint(f"{root}/ckpt", 1, [model], RunConfig(model=mc, parallel=ParallelSettings(tensor_parallel_size=2)))
    listed = sorted(json.loads((ckpt / "checksums.json").read_text())["files"])
    load_model_weights(ckpt, [model])  # a good one loads at the layout that saved it
    dist.barrier()
    if rank == 0:
        _xor_middle(ckpt / "__1_0.distcp")
    dist.barrier()
    try:
        load_model_weights(ckpt, [model])
        error = None
    except CheckpointError as e:
        error = str(e)
    return {"listed": listed, "error": error, "shard": str(ckpt / "__1_0.distcp")}


def test_two_rank_save_hashes_every_rank_and_both_ranks_refuse_the_damage(tmp_path):
    out = run_distributed(_two_rank_worker, 2, str(tmp_path))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt", "train_state.json"} <= set(out[0]["listed"])
    for result in out:  # the damaged shard was hashed by one rank; both raise the same error
        assert result["error"] is not None and f"{result['shard']} is damaged" in result["error"]
    assert out[0]["error"] == out[1]["error"]


def test_the_shard_index_is_parsed_once_per_resume_and_again_when_it_changes(saved, tmp_path, monkeypatch):
    """Opening a checkpoint (completeness) and its shape check read the same .metadata: parsed once
    while the file is unchanged; a rewritten index is parsed again, and damage to it is still named."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_osp.training.checkpoint import resolve_checkpoint
    from megatron_osp.training.checkpoint_integrity import CheckpointError, read_index
    from megatron_osp.training.checkpoint_shapes import saved_shapes

    run = _copy_run(saved, tmp_path)
    parses = []
    real = FileSystemReader.read_metadata
    monkeypatch.setattr(FileSystemReader, "read_metadata", lambda self: parses.append(1) or real(self))
    ckpt = resolve_checkpoint(run / "checkpoints")
    shapes = saved_shapes(ckpt)
    assert len(parses) == 1 and shapes
    index = ckpt / ".metadata"
    index.write_bytes(index.read_bytes())  # rewritten: a new modification time
    os.utime(index, ns=(index.stat().st_atime_ns, index.stat().st_mtime_ns + 1_000_000))
    assert saved_shapes(ckpt) == shapes and len(parses) == 2
    _replace_once(index, *_RENAME_IN_INDEX, last=True)
    os.utime(index, ns=(index.stat().st_atime_ns, index.stat().st_mtime_ns + 2_000_000))
    with pytest.raises(CheckpointError, match=".metadata"):  # the manifest's check, before any parse
        resolve_checkpoint(run / "checkpoints")
    assert len(parses) == 2
    read_index(ckpt)
    assert read_index(ckpt) is read_index(ckpt) and len(parses) == 3
