"""Faults on disk, injected as a user meets them: damaged files, a lost or garbled manifest, a
writer killed with SIGKILL half-way, concurrent writers and concurrent first-time conversions.

Each case checks the user-visible contract: a damaged file is never read as if it were good (it
is recomputed, saying so, or named in the error), intact work is never lost, and nothing a killed
writer left behind survives the next writer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import interp
from interp.cache import CacheError, CacheStore
from interp.cli import main
from interp.heads import table as T

from conftest import make_hf, make_tiny, word_tokenizer

TESTS = Path(__file__).resolve().parents[1]
PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
HOOKS = "blocks.*.hook_resid_post"
RESID_POST = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
DAMAGE = ["flipped byte", "truncated", "empty", "missing"]


def damage(path: Path, kind: str) -> bytes:
    """Damage `path` the way a disk or a user does; returns the damaged bytes ('' when missing)."""
    data = bytearray(path.read_bytes())
    if kind == "flipped byte":
        data[-5] ^= 0xFF  # inside the last tensor's bytes: the file still parses
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "empty":
        data = bytearray()
    elif kind == "missing":
        path.unlink()
        return b""
    path.write_bytes(bytes(data))
    return bytes(data)


def temps(folder: Path) -> list[Path]:
    """Temporary files of any writer, old naming or new."""
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]


# ---------------------------------------------------------------------------- subprocesses
def spawn(script: str, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Run a Python snippet in a fresh process (stdout and stderr to `log`)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    """Poll until `condition()`; fail with the process's output if it exits first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the helper process exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out; helper output:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its pid is now dead


# A patch applied before interp is imported, so every writer in the toolkit uses it: the real
# save_file writes the temporary file, then the process reports the path and stalls until killed.
STALL_SAVE = """
    import pathlib, sys, time
    import safetensors.torch as st
    _real = st.save_file
    def _stalled(tensors, filename, metadata=None):
        _real(tensors, filename, metadata=metadata)
        pathlib.Path(sys.argv[1]).write_text(str(filename))
        time.sleep(600)
    st.save_file = _stalled
"""


# ---------------------------------------------------------------------------- the activation cache store
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "tiny-llama"
    make_hf("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return interp.load(model_dir)


def cache_cli(model_dir: Path, out: Path, prompts: list[str], *extra: str) -> list[str]:
    prompts_file = out.parent / f"{out.name}-prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    return ["cache", str(model_dir), "--prompts", str(prompts_file), "--hooks", HOOKS, "--out", str(out), "--quiet", *extra]


def entry_path(store: CacheStore, model, prompt: str) -> Path:
    key = store.key_for(model, model.to_tokens(prompt), RESID_POST)
    return store.root / store.manifest()["entries"][key]["file"]


def assert_store_is_right(store: CacheStore, model, prompts: list[str]) -> None:
    """Every prompt's entry loads and equals a fresh forward pass."""
    for prompt in prompts:
        stored = store.load(store.key_for(model, model.to_tokens(prompt), RESID_POST))
        with torch.no_grad():
            _, reference = model.run_with_cache(prompt, names_filter=RESID_POST)
        assert all(torch.equal(stored[n], reference[n]) for n in RESID_POST)


@pytest.mark.parametrize("kind", DAMAGE)
def test_cache_resume_recomputes_a_damaged_entry_and_says_so(model_dir, model, tmp_path, capsys, kind):
    out = tmp_path / "acts"
    argv = cache_cli(model_dir, out, PROMPTS)
    assert main(argv) == 0
    store = CacheStore(out)
    path = entry_path(store, model, PROMPTS[1])
    damaged = damage(path, kind)
    capsys.readouterr()

    assert main(argv) == 0
    captured = capsys.readouterr()
    status = "missing" if kind == "missing" else "damaged"
    counts = "1 damaged, 0 missing" if status == "damaged" else "0 damaged, 1 missing"
    assert captured.out.startswith(f"0 new, 2 already cached, 1 recomputed ({counts})")
    assert "prompt 2" in captured.err and "recomputing" in captured.err
    if status == "damaged":  # moved aside, never overwritten, and the message says where
        aside = out / "damaged" / path.name
        assert aside.read_bytes() == damaged and str(aside) in captured.err
    assert_store_is_right(store, model, PROMPTS)
    assert main(argv) == 0 and capsys.readouterr().out.startswith("0 new, 3 already cached;")


def test_cache_resume_with_one_corrupt_and_one_missing_entry(model_dir, model, tmp_path, capsys):
    """The probe's case: it reported '0 new, 3 already cached' and exited 0."""
    out = tmp_path / "acts"
    argv = cache_cli(model_dir, out, PROMPTS)
    assert main(argv) == 0
    store = CacheStore(out)
    damage(entry_path(store, model, PROMPTS[0]), "flipped byte")
    damage(entry_path(store, model, PROMPTS[2]), "missing")
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("0 new, 1 already cached, 2 recomputed (1 damaged, 1 missing)")
    assert_store_is_right(store, model, PROMPTS)


MANIFEST_DAMAGE = {
    "deleted": None,
    "garbled JSON": '{"version": 1, "entries": {"ab',
    "truncated to nothing": "",
    "not a manifest": '["entries"]',
    "entries without checksums": '{"version": 1, "entries": {"k": {"file": 3}}}',
}


@pytest.mark.parametrize("how", list(MANIFEST_DAMAGE))
def test_a_lost_manifest_strands_no_entry(model_dir, model, tmp_path, capsys, how):
    out = tmp_path / "acts"
    argv = cache_cli(model_dir, out, PROMPTS)
    assert main(argv) == 0
    manifest = out / "manifest.json"
    if MANIFEST_DAMAGE[how] is None:
        manifest.unlink()
    else:
        manifest.write_text(MANIFEST_DAMAGE[how])
    capsys.readouterr()

    assert main(argv) == 0  # rebuilt from the entry files, which carry their keys: nothing recomputed
    captured = capsys.readouterr()
    assert captured.out.startswith("0 new, 3 already cached;")
    assert "rebuilt it from the entry files (3 intact entries kept" in captured.err
    if MANIFEST_DAMAGE[how] is not None:  # the unreadable manifest is kept aside, not overwritten
        assert (out / "damaged" / "manifest.json").read_text() == MANIFEST_DAMAGE[how]
    assert_store_is_right(CacheStore(out), model, PROMPTS)


def test_rebuild_moves_a_damaged_entry_aside_instead_of_adopting_it(model_dir, model, tmp_path, capsys):
    """With the manifest gone, the checksum each entry file carries still catches a flipped byte."""
    out = tmp_path / "acts"
    assert main(cache_cli(model_dir, out, PROMPTS)) == 0
    store = CacheStore(out)
    bad = entry_path(store, model, PROMPTS[1])
    flipped = damage(bad, "flipped byte")
    (out / "manifest.json").unlink()
    capsys.readouterr()

    assert main(cache_cli(model_dir, out, PROMPTS)) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("1 new, 2 already cached;")
    assert "2 intact entries kept; 1 damaged file(s) moved aside" in captured.err and bad.name in captured.err
    assert (out / "damaged" / bad.name).read_bytes() == flipped
    assert_store_is_right(store, model, PROMPTS)


def test_cache_repair_adopts_orphans_and_sets_damaged_files_aside(model_dir, model, tmp_path, capsys):
    out = tmp_path / "acts"
    assert main(cache_cli(model_dir, out, PROMPTS[:2])) == 0
    store = CacheStore(out)
    # A file written completely by a writer killed before the manifest named it, and a damaged one.
    orphan_source = tmp_path / "other"
    assert main(cache_cli(model_dir, orphan_source, PROMPTS[2:])) == 0
    orphan = entry_path(CacheStore(orphan_source), model, PROMPTS[2])
    os.replace(orphan, out / orphan.name)
    bad = entry_path(store, model, PROMPTS[0])
    damage(bad, "truncated")
    capsys.readouterr()

    assert main(cache_cli(model_dir, out, PROMPTS, "--repair")) == 0
    captured = capsys.readouterr()
    assert "repaired" in captured.err and "2 intact entries kept" in captured.err and bad.name in captured.err
    assert captured.out.startswith("1 new, 2 already cached;")  # only the damaged one is recomputed
    assert (out / "damaged" / bad.name).exists()
    assert_store_is_right(store, model, PROMPTS)


def acts(seed: int, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.hook_resid_post": torch.randn(1, size, 8, generator=g)}


def test_a_writer_killed_mid_write_leaves_nothing_behind(tmp_path, capsys):
    store = CacheStore(tmp_path / "store")
    store.put("k0", acts(0))
    marker = tmp_path / "temp-path"
    proc = spawn(STALL_SAVE + """
    import torch
    from interp.cache import CacheStore
    CacheStore(sys.argv[2]).put("k1", {"blocks.0.hook_resid_post": torch.ones(1, 4096, 64)})
    """, str(marker), str(store.root), log=tmp_path / "writer.log")
    wait_for(marker.exists, proc, tmp_path / "writer.log")
    left = Path(marker.read_text())
    assert left.exists() and left.parent == store.root
    kill(proc)
    assert left.exists()  # what SIGKILL leaves: a complete temporary file nobody renamed

    store.put("k2", acts(2))  # the next writer removes it, under the store's lock, and says so
    assert not left.exists() and not temps(store.root)
    assert "temporary file(s) left by a killed writer" in capsys.readouterr().err
    assert sorted(store.keys()) == ["k0", "k2"]
    assert torch.equal(store.load("k2")["blocks.0.hook_resid_post"], acts(2)["blocks.0.hook_resid_post"])


def test_concurrent_writers_and_a_rebuild_lose_nothing(tmp_path):
    """Two processes put into one store whose manifest was lost: the rebuild and both writers' entries all survive."""
    store = CacheStore(tmp_path / "store")
    for i in range(3):
        store.put(f"old{i}", acts(i))
    (store.root / "manifest.json").unlink()
    go = tmp_path / "go"
    script = """
    import pathlib, sys, time
    import torch
    from interp.cache import CacheStore
    root, tag, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    store = CacheStore(root)
    for i in range(6):
        g = torch.Generator().manual_seed(100 + i)
        store.put(f"{tag}{i}", {"blocks.0.hook_resid_post": torch.randn(1, 64, 8, generator=g)})
        store.put("shared", {"blocks.0.hook_resid_post": torch.zeros(1, 64, 8)})
    """
    procs = [spawn(script, str(store.root), tag, str(go), log=tmp_path / f"{tag}.log") for tag in ("a", "b")]
    time.sleep(1.0)
    go.touch()
    for tag, proc in zip(("a", "b"), procs, strict=True):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{tag}.log").read_text()[-3000:]
    expected = {f"old{i}" for i in range(3)} | {f"{t}{i}" for t in "ab" for i in range(6)} | {"shared"}
    assert set(store.keys()) == expected
    for i in range(3):
        assert torch.equal(store.load(f"old{i}")["blocks.0.hook_resid_post"], acts(i)["blocks.0.hook_resid_post"])
    for key in expected:
        store.load(key)  # checksum and key verified
    assert not temps(store.root)


# ---------------------------------------------------------------------------- head-table parts
HEAD_SETTINGS = {"analyses": ("sink",), "n_prompts": 3, "length": 12}


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def fresh_table(tiny, tmp_path_factory) -> pd.DataFrame:
    parts = tmp_path_factory.mktemp("fresh") / "parts"
    T.run_head_job(tiny, parts, T.HeadJobSettings(**HEAD_SETTINGS), progress=False)
    return T.merge_head_parts([parts])


@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "missing"])  # a missing part: test_head_table
def test_a_damaged_head_part_is_named_by_merge_and_recomputed_on_resume(tiny, fresh_table, tmp_path, capsys, kind):
    settings = T.HeadJobSettings(**HEAD_SETTINGS)
    parts = tmp_path / "heads.parquet.parts"
    T.run_head_job(tiny, parts, settings, progress=False)
    part = parts / "sink" / "000001.safetensors"
    damage(part, kind)

    with pytest.raises(CacheError, match=str(part)) as info:
        T.merge_head_parts([parts])
    assert "interp heads" in str(info.value)  # says how to recompute it

    capsys.readouterr()
    assert T.run_head_job(tiny, parts, settings, progress=False) == {"sink": 1}
    assert f"{part}" in capsys.readouterr().err
    pd.testing.assert_frame_equal(T.merge_head_parts([parts]), fresh_table, check_exact=True)


def test_merge_through_the_cli_refuses_a_flipped_byte(tiny, tmp_path, capsys):
    """The probe's case: one flipped byte changed a value and `interp merge` exited 0."""
    parts = tmp_path / "heads.csv.parts"
    T.run_head_job(tiny, parts, T.HeadJobSettings(**HEAD_SETTINGS), progress=False)
    damage(parts / "sink" / "000002.safetensors", "flipped byte")
    capsys.readouterr()
    try:  # reported as an exit status with one line on stderr, or raised: either way it names the file
        status, message = main(["merge", str(parts), "--out", str(tmp_path / "m.csv")]), capsys.readouterr().err
    except CacheError as e:
        status, message = 1, str(e)
    assert status != 0 and str(parts / "sink" / "000002.safetensors") in message
    assert not (tmp_path / "m.csv").exists()


def test_a_killed_head_job_leaves_nothing_and_a_live_writer_keeps_its_file(tiny, fresh_table, tmp_path, capsys):
    parts = tmp_path / "heads.parquet.parts"
    marker = tmp_path / "temp-path"
    proc = spawn(STALL_SAVE + """
    from conftest import make_tiny
    from interp.heads import table as T
    T.run_head_job(make_tiny("llama"), pathlib.Path(sys.argv[2]), T.HeadJobSettings(analyses=("sink",), n_prompts=3, length=12),
                   progress=False)
    """, str(marker), str(parts), log=tmp_path / "job.log")
    wait_for(marker.exists, proc, tmp_path / "job.log")
    left = Path(marker.read_text())
    settings = T.HeadJobSettings(**HEAD_SETTINGS)
    try:
        T.run_head_job(tiny, parts, settings, progress=False)  # alongside a live writer of the same folder
        assert left.exists(), "a live writer's temporary file was removed"
    finally:
        kill(proc)
    assert left.exists()
    capsys.readouterr()
    assert T.run_head_job(tiny, parts, settings, progress=False) == {"sink": 0}
    assert not left.exists() and not temps(parts)
    assert "left by a killed writer" in capsys.readouterr().err
    pd.testing.assert_frame_equal(T.merge_head_parts([parts]), fresh_table, check_exact=True)


# ---------------------------------------------------------------------------- first-time model conversion
# A gate inside the conversion, set before interp is imported: the real save_pretrained fills the
# temporary folder, then the process reports it and waits for `release` (never, when it is killed).
GATED_CONVERSION = """
    import os, pathlib, sys, time
    from transformers import PreTrainedModel
    _real = PreTrainedModel.save_pretrained
    markers, gguf = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    def _gated(self, directory, *args, **kwargs):
        _real(self, directory, *args, **kwargs)
        (markers / f"inside-{os.getpid()}").write_text(str(directory))
        deadline = time.time() + 300
        while not (markers / "release").exists() and time.time() < deadline:
            time.sleep(0.05)
    PreTrainedModel.save_pretrained = _gated
    from interp.models.bundled import convert_gguf
    print("converted:", convert_gguf(gguf, progress=False))
"""


def test_a_killed_conversion_leaves_nothing_for_the_next(tiny_gguf, tmp_path):
    from interp.models.bundled import convert_gguf

    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"INTERP_CACHE": str(tmp_path / "cache")}
    proc = spawn(GATED_CONVERSION, str(markers), str(tiny_gguf), log=tmp_path / "convert.log", env=env)
    wait_for(lambda: any(markers.glob("inside-*")), proc, tmp_path / "convert.log")
    left = Path(next(markers.glob("inside-*")).read_text())
    kill(proc)
    assert (left / "model.safetensors").exists()  # the half-done conversion's weights

    directory = convert_gguf(tiny_gguf, progress=False)
    converted = tmp_path / "cache" / "converted"
    assert (directory / "config.json").exists() and not left.exists() and not temps(converted)
    model = interp.load(tiny_gguf)
    assert model.cfg.n_layers == 2


def test_concurrent_first_conversions_wait_for_each_other(tiny_gguf, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"INTERP_CACHE": str(tmp_path / "cache")}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = spawn(GATED_CONVERSION, str(markers), str(tiny_gguf), log=logs[0], env=env)
    wait_for(lambda: any(markers.glob("inside-*")), first, logs[0])
    second = spawn(GATED_CONVERSION, str(markers), str(tiny_gguf), log=logs[1], env=env)
    try:
        # The second either waits on the lock (and says so) or, without one, converts alongside.
        wait_for(lambda: "another process is converting" in logs[1].read_text() or len(list(markers.glob("inside-*"))) > 1,
                 second, logs[1])
    finally:
        (markers / "release").touch()
    codes = [first.wait(timeout=300), second.wait(timeout=300)]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    assert len(list(markers.glob("inside-*"))) == 1  # converted once
    outputs = {log.read_text().split("converted:")[-1].strip() for log in logs}
    assert len(outputs) == 1 and (Path(outputs.pop()) / "config.json").exists()
    assert not temps(tmp_path / "cache" / "converted")


def test_converted_folder_left_incomplete_by_hand_is_set_aside_not_merged(tiny_gguf, tmp_path, capsys):
    from interp.models.bundled import convert_gguf, converted_dir

    target = converted_dir(tiny_gguf)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"partial")  # a folder without config.json
    directory = convert_gguf(tiny_gguf, progress=False)
    assert directory == target and (target / "config.json").exists()
    assert "moved it to" in capsys.readouterr().err
    assert interp.load(tiny_gguf).cfg.n_layers == 2
