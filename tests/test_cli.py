"""The `interp` command on a saved tiny llama directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import interp
from interp.cache import CacheStore
from interp.cli import main

from conftest import make_hf, word_tokenizer

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
RESID_POST = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-llama"
    make_hf("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def exit_code(argv) -> object:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_help(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("lens", "cache", "hooks"))
    assert exit_code(["cache", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--prompts" in out and "--hooks" in out and "--out" in out
    assert exit_code([]) == 2  # a subcommand is required
    capsys.readouterr()


def test_help_as_a_module():
    done = subprocess.run([sys.executable, "-m", "interp.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: interp" in done.stdout


def test_cache_command_writes_a_resumable_store(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is skipped
    out = tmp_path / "acts"
    argv = ["cache", str(model_dir), "--prompts", str(prompts), "--hooks", "blocks.*.hook_resid_post", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("3 new, 0 already cached; 2 hooks per prompt")

    model = interp.load(model_dir)
    store = CacheStore(out)
    assert len(store.keys()) == 3
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        key = store.key_for(model, tokens, RESID_POST)
        with torch.no_grad():
            _, reference = model.run_with_cache(prompt, names_filter=RESID_POST)
        stored = store.load(key)
        assert set(stored) == set(RESID_POST)
        assert all(torch.equal(stored[n], reference[n]) for n in RESID_POST)

    manifest = (out / "manifest.json").read_text()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("0 new, 3 already cached")
    assert (out / "manifest.json").read_text() == manifest

    prompts.write_text("\n".join(PROMPTS + ["w20 w21"]) + "\n")  # one more prompt: only it is computed
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("1 new, 3 already cached")
    assert len(json.loads((out / "manifest.json").read_text())["entries"]) == 4


def test_cache_command_errors(model_dir, tmp_path, capsys):
    def refused(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("interp: error: ") and "Traceback" not in err
        return err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n")
    base = ["cache", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "acts"), "--quiet"]
    message = refused(base + ["--hooks", "blocks.*.hook_resid_pots"])
    assert "matches none of the model's" in message
    assert "blocks.0.hook_resid_post" in message or "blocks.1.hook_resid_post" in message  # near matches named
    assert not (tmp_path / "acts" / "manifest.json").exists()
    assert "does not exist" in refused(["cache", str(model_dir), "--prompts", str(tmp_path / "none.txt"),
                                        "--hooks", "hook_embed", "--out", str(tmp_path / "acts")])
    prompts.write_text("\n\n")
    assert "has no prompts" in refused(base + ["--hooks", "hook_embed"])


def test_hooks_command(model_dir, capsys):
    assert main(["hooks", str(model_dir), "--filter", "blocks.0.attn.*"]) == 0
    printed = capsys.readouterr().out.split()
    expected = {f"blocks.0.attn.hook_{x}" for x in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")}
    assert set(printed) == expected and len(printed) == len(expected)
    assert main(["hooks", str(model_dir)]) == 0
    assert len(capsys.readouterr().out.split()) == len(interp.load(model_dir).hook_names())


def test_lens_command(model_dir, tmp_path, capsys):
    csv = tmp_path / "lens.csv"
    assert main(["lens", str(model_dir), "--prompt", "w5 w6 w7", "--target", "w9", "--out", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "prompt tokens: ['w5', 'w6', 'w7']" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "label"])
    # Labelled for a reader: KL in nats, the target's rank 0-based, said so.
    assert "kl_to_final (nats)" in lines[header] and "rank of 'w9' (0 = top1)" in lines[header]
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert [r[:2] for r in rows] == [["0", "0_pre"], ["1", "1_pre"], ["2", "final_post"]]
    assert rows[2][2] == "0.000"  # KL of the final layer to itself
    # The final row's top token is the model's own prediction at the last position, quoted.
    with torch.no_grad():
        top = int(make_hf("llama")(torch.tensor([[5, 6, 7]])).logits[0, -1].argmax())
    assert rows[2][3] == f"'w{top}'"
    import pandas as pd

    table = pd.read_csv(csv)  # the file keeps the raw values and column names
    assert list(table["label"]) == ["0_pre", "1_pre", "final_post"] and "p('w9')" in table.columns
    assert list(table.columns[:4]) == ["layer", "label", "kl_to_final", "top1"] and table["top1"].iloc[-1] == f"w{top}"
    assert table["rank('w9')"].dtype.kind == "i"
