"""The `interp` command on bad input, as a user hits it: one line on stderr that says what is wrong
and what to do, exit status 2, no traceback, nothing written; `--debug` shows the traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from interp.cli import UsageError, main
from interp.heads.table import HeadJobSettings

from conftest import make_hf, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-errors") / "tiny-llama"
    make_hf("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def refused(argv, capsys) -> str:
    """Run the command; it must exit 2 with exactly one `interp: error:` line on stderr. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interp: error: "), err
    return lines[0]


def heads(model_dir, out, *flags):
    return ["heads", model_dir, "--out", str(out), "--quiet", *flags]


# Refused before the model loads. Each case: argv (MODEL = the tiny model directory, TMP = an
# empty folder) and the words the message must hold.
BEFORE_LOADING = [
    (["lens", "MODEL", "--out", "TMP/lens.xlsx"], ["--out", ".csv or .parquet", "lens.parquet"]),
    (["lens", "MODEL", "--top-k", "-1"], ["--top-k -1", "0 or more"]),
    (["lens", "MODEL", "--prompt", " "], ["--prompt is empty"]),
    (["lens", "MODEL", "--target", ""], ["--target '' is empty", "' Paris'"]),
    (["lens", "MODEL", "--dtype", "int8"], ["--dtype 'int8'", "float32"]),
    (["lens", "MODEL", "--device", "cuda:99"], ["--device cuda:99", "--device cpu"]),
    (["hooks", "MODEL", "--filter", " , "], ["--filter", "no pattern", "blocks.*.hook_resid_post"]),
    (["cache", "MODEL", "--prompts", "TMP/none.txt", "--hooks", "hook_embed", "--out", "TMP/acts"],
     ["--prompts", "none.txt does not exist", "one prompt per line"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--prompts", "-1"], ["--prompts: -1 is out of range", "0 (all 18)"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--prompts", "19"], ["--prompts: 19 is out of range"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--length", "1"], ["--length: 1 is too short", "use 4 or more"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--length", "3"], ["--length: 3 is too short"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--analyses", ""], ["--analyses: none given", "sink, ablation, importance, retrieval"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--analyses", "sink,sinks"], ["unknown analyses ['sinks']", "retrieval"]),
    (["heads", "MODEL", "--out", "TMP/h.txt"], ["--out", ".csv or .parquet", "h.parquet"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--shard", "2/2"], ["--shard 2/2", "0 <= i < n"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--shard", "1of2"], ["--shard", "i/n"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--niah-lengths", "1k"], ["--niah-lengths '1k'", "1024,2048"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--niah-depths", "0,2"], ["--niah-depths", "[0, 1]"]),
    (["heads", "MODEL", "--out", "TMP/h.csv", "--niah-per-cell", "0"], ["--niah-per-cell: 0", "1 or more"]),
    (["merge", "TMP/none.parts", "--out", "TMP/m.csv"], ["none.parts does not exist", "<out>.parts"]),
    (["merge", "TMP", "--out", "TMP/m.csv"], ["has no job.json"]),
    (["merge", "TMP", "--out", "TMP/m.txt"], ["--out", ".csv or .parquet"]),
]


@pytest.mark.parametrize("argv, words", BEFORE_LOADING, ids=[" ".join(a[2:] if a[0] != "merge" else a) for a, _ in BEFORE_LOADING])
def test_bad_arguments_are_refused_before_the_model_loads(argv, words, model_dir, tmp_path, monkeypatch, capsys):
    import interp

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(interp, "load", no_loading)
    argv = [a.replace("MODEL", model_dir).replace("TMP", str(tmp_path)) for a in argv]
    line = refused(argv, capsys)
    assert all(w in line for w in words), line
    assert list(tmp_path.iterdir()) == []  # nothing written: no table, no parts folder, no job.json


def test_the_installed_command_exits_2_with_one_line_and_debug_shows_the_traceback():
    done = subprocess.run([sys.executable, "-m", "interp.cli", "lens", "no-such-model"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [
        "interp: error: 'no-such-model' is neither a bundled model (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b) nor an existing path. Hub names are not "
        "downloaded: this toolkit never goes to the network; pass a local directory or file."
    ]
    done = subprocess.run([sys.executable, "-m", "interp.cli", "--debug", "lens", "no-such-model"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_unknown_model_and_not_a_model_directory(tmp_path, capsys):
    assert "neither a bundled model (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b) nor an existing path" in refused(["lens", "no-such-model"], capsys)
    assert "has no config.json" in refused(["hooks", str(tmp_path)], capsys)


def test_patterns_that_match_no_hook(model_dir, tmp_path, capsys):
    for pattern in ("blocks.[", "nothing*"):
        line = refused(["hooks", model_dir, "--filter", f"blocks.0.*,{pattern}"], capsys)
        assert f"--filter pattern {pattern!r} matches none of the model's" in line and f"interp hooks {model_dir}" in line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n")
    line = refused(["cache", model_dir, "--prompts", str(prompts), "--hooks", "blocks.*.hook_resid_pots",
                    "--out", str(tmp_path / "acts"), "--quiet"], capsys)
    assert "--hooks pattern 'blocks.*.hook_resid_pots'" in line and "blocks.0.hook_resid_post" in line  # near miss named
    assert not (tmp_path / "acts").exists()


def test_a_target_of_several_tokens(model_dir, tmp_path, capsys):
    line = refused(["lens", model_dir, "--target", "w9", "--target", "w10 w11", "--out", str(tmp_path / "l.csv")], capsys)
    assert re.search(r"--target 'w10 w11' is \d+ tokens \[.+\] for this model, not one; pass a single token", line), line
    assert not (tmp_path / "l.csv").exists()


def test_a_job_with_other_settings_in_the_parts_folder(model_dir, tmp_path, capsys):
    args = heads(model_dir, tmp_path / "h.csv", "--analyses", "sink", "--prompts", "1", "--length", "8")
    assert main(args) == 0
    capsys.readouterr()
    line = refused(args[:-1] + ["9"], capsys)  # --length 9 against the folder of --length 8
    assert "different settings" in line and "choose another --out or delete that folder" in line


def test_library_errors_become_one_line_but_bugs_keep_their_traceback(model_dir, monkeypatch, capsys):
    import interp.cli as cli

    def interp_raises(args):
        from interp.models.loading import _dtype

        return _dtype("int8")  # a ValueError raised by the toolkit on bad input

    monkeypatch.setattr(cli, "_load", interp_raises)
    assert "unknown dtype 'int8'" in refused(["hooks", model_dir], capsys)

    def a_bug(args):
        return int("not a number")  # a ValueError that no check of ours raised: a bug, shown in full

    monkeypatch.setattr(cli, "_load", a_bug)
    with pytest.raises(ValueError, match="invalid literal"):
        main(["hooks", model_dir])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path):
    def argv(*rest):
        return ["--debug", *rest] if where == "before" else [*rest, "--debug"]

    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        main(argv("lens", "no-such-model"))
    with pytest.raises(UsageError, match="--length: 1 is too short"):
        main(argv("heads", "no-such-model", "--out", str(tmp_path / "h.csv"), "--length", "1"))


def test_head_job_settings_refuse_bad_values():
    cases = [
        (dict(n_prompts=-1), "n_prompts: -1 is out of range"),
        (dict(n_prompts=19), "n_prompts: 19 is out of range"),
        (dict(length=1), "length: 1 is too short"),
        (dict(length=3), "with fewer than 4 tokens"),
        (dict(length=4, eps=0.2), "use 5 or more"),
        (dict(analyses=()), "analyses: none given"),
        (dict(analyses=("sink", "sink")), r"\['sink'\] listed more than once"),
        (dict(analyses=("sinks",)), "unknown analyses"),
        (dict(ablation="mean"), "use 'zero'"),
        (dict(eps=0.0), r"eps: 0.0 .* \(0, 1\)"),
        (dict(niah_lengths=()), "niah_lengths"),
        (dict(niah_depths=(1.5,)), r"needle depths in \[0, 1\]"),
        (dict(niah_per_cell=0), "niah_per_cell: 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            HeadJobSettings(**kwargs)
    assert HeadJobSettings(length=4).length == 4 and HeadJobSettings(n_prompts=18).n_prompts == 18


@pytest.mark.bundled
def test_targets_and_the_leading_space_on_smollm2(smollm, capsys):
    line = refused(["lens", "smollm2-135m", "--target", "Barcelona"], capsys)
    assert "--target 'Barcelona' is 3 tokens" in line and "use --target ' Barcelona'" in line
    assert main(["lens", "smollm2-135m", "--target", "Paris", "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    assert "'Paris' is the token without a leading space" in err and "pass --target ' Paris'" in err
    assert "rank of 'Paris' (0 = top1)" in out
