"""`interp heads` and `interp cache` under torchrun: 2 CPU ranks (gloo) give exactly the single-process
table and store, and a rank killed mid-job is restarted by torchrun and resumes from its finished parts.

Each rank runs with one thread (torchrun's default, OMP_NUM_THREADS=1), and so does the in-process
single-process reference: on the CPU, torch's reductions split by thread count, so bitwise equality
needs the same thread count on both sides (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from interp.cli import main
from interp.distributed import Launch, launched, pick_device, replica_gpus
from interp.store import read_checked

from conftest import make_hf, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["--prompts", "4", "--length", "12", "--analyses", "sink,ablation,importance", "--quiet"]
PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14 w15", "w16 w17 w18"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchrun") / "tiny-llama"
    make_hf("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@contextlib.contextmanager
def one_thread():
    """The thread count of a torchrun worker, for the in-process reference run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun(*argv: str, env: dict | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 -m interp <argv>` on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "interp", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def one(model_dir, tmp_path_factory) -> pd.DataFrame:
    """The head table of a single-process run (in this process, one thread)."""
    out = tmp_path_factory.mktemp("single") / "one.parquet"
    with one_thread():
        assert main(["heads", str(model_dir), *HEADS, "--out", str(out)]) == 0
    return pd.read_parquet(out)


def test_heads_under_torchrun_equal_a_single_process_run(model_dir, one, tmp_path):
    done = torchrun("heads", str(model_dir), *HEADS, "--out", str(tmp_path / "two.parquet"))
    assert "[rank 0/2] computed now: sink 2, ablation 2, importance 2" in done.stdout
    assert "[rank 1/2] computed now: sink 2, ablation 2, importance 2" in done.stdout
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes the table
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two.parquet"), one, check_exact=True)


def test_a_killed_rank_is_restarted_and_resumes_from_its_parts(model_dir, one, tmp_path):
    out = tmp_path / "two.parquet"
    # rank 1 dies (os._exit(1)) right after its 3rd part (its 2 sink prompts and 1 ablation prompt), on
    # the first attempt only; torchrun stops rank 0 and restarts both
    crash = {"INTERP_TEST_CRASH_AFTER": "3", "INTERP_TEST_CRASH_RANK": "1"}
    done = torchrun("heads", str(model_dir), *HEADS, "--out", str(out), env=crash, restarts=1)
    assert "exiting after 3 part(s) (test hook)" in done.stderr
    # the restarted rank 1 verified and kept its 3 finished parts and computed only the other 3
    assert "[rank 1/2, restart 1] computed now: sink 0, ablation 1, importance 2" in done.stdout
    assert re.search(r"\[rank 0/2, restart 1\] computed now", done.stdout)
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)
    parts = Path(str(out) + ".parts")
    assert not list(parts.rglob(".tmp-*"))  # what the killed ranks left was cleaned up


def _store(root: Path) -> dict:
    """Each manifest entry (without its creation time and file checksum) with its file's metadata and tensors.

    The entry files are compared by content, not bytes: safetensors writes the metadata in a
    different key order in every process (a Rust HashMap), so two runs never give the same bytes.
    """
    entries = json.loads((root / "manifest.json").read_text())["entries"]
    return {key: ({k: v for k, v in e.items() if k not in ("created", "sha256")}, *read_checked(root / e["file"])[::-1])
            for key, e in entries.items()}


def test_cache_under_torchrun_equals_a_single_process_store(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["cache", str(model_dir), "--prompts", str(prompts), "--hooks", "blocks.*.hook_resid_post,blocks.0.attn.hook_z", "--quiet"]
    with one_thread():
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun(*common, "--out", str(tmp_path / "two"))
    assert "[rank 0/2] prompts 1-2 of 5: 2 new, 0 already cached" in done.stdout
    assert "[rank 1/2] prompts 3-5 of 5: 3 new, 0 already cached" in done.stdout
    assert "all 2 ranks done" in done.stdout and "(5 entries)" in done.stdout
    one, two = _store(tmp_path / "one"), _store(tmp_path / "two")
    assert len(one) == 5 and two.keys() == one.keys()
    for key, (entry, meta, tensors) in one.items():
        assert two[key][:2] == (entry, meta)  # the same manifest entry and file metadata (the tensors' checksum included)
        assert two[key][2].keys() == tensors.keys() and all(torch.equal(two[key][2][n], t) for n, t in tensors.items())
    assert not list((tmp_path / "two").glob(".tmp-*"))


# ---------------------------------------------------------------------------- the launch, without torchrun
def test_launch_comes_from_torchruns_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert launched() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK is not"):
        launched()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    launch = launched()
    assert launch == Launch(3, 4, 1, 2) and launch.shard == (3, 4) and not launch.is_main
    assert launch.tag() == "[rank 3/4, restart 2]"
    assert pick_device("cpu", launch) == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(None, launch) is None and pick_device("cuda", launch) == "cuda"  # the CPU; cuda is refused later
    assert replica_gpus(1, 2, visible=8) == [2, 3]
    with pytest.raises(ValueError, match="nproc_per_node=2"):
        replica_gpus(2, 4, visible=8)


def test_shard_flag_is_refused_under_torchrun(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["heads", str(model_dir), *HEADS, "--out", str(tmp_path / "t.csv"), "--shard", "1/2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("interp: error: --shard 1/2 under torchrun: each rank computes shard RANK/WORLD_SIZE (1/2 here)")
    assert not (tmp_path / "t.csv.parts").exists()
