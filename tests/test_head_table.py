"""The head-table job: per-prompt parts, resume after a kill, shards merged = unsharded run, the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from interp.cache import CacheError
from interp.cli import main
from interp.heads import importance, retrieval, sinks
from interp.heads import table as T

from conftest import make_tiny

SETTINGS = dict(analyses=("sink", "ablation", "importance"), n_prompts=5, length=12)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def test_sharded_and_merged_equals_unsharded(model, tmp_path):
    settings = T.HeadJobSettings(**SETTINGS)
    T.run_head_job(model, tmp_path / "all", settings, progress=False)
    whole = T.merge_head_parts([tmp_path / "all"])
    for i in range(3):
        T.run_head_job(model, tmp_path / f"s{i}", settings, shard=(i, 3), progress=False)
    with pytest.raises(CacheError, match="missing"):
        T.merge_head_parts([tmp_path / "s0", tmp_path / "s2"])
    merged = T.merge_head_parts([tmp_path / f"s{i}" for i in range(3)])
    pd.testing.assert_frame_equal(merged, whole, check_exact=True)
    assert len(whole) == model.cfg.n_layers * model.cfg.n_heads
    assert {"sink_score", "is_sink", "ablation_delta", "importance", "fingerprint", "settings"} <= set(whole.columns)
    assert json.loads(whole.settings[0])["length"] == 12 and whole.fingerprint[0] == model.fingerprint()


def test_table_values_equal_the_analysis_modules(model, tmp_path):
    """The job's per-prompt bookkeeping gives the numbers of the analyses run on the whole set at once."""
    settings = T.HeadJobSettings(**SETTINGS)
    T.run_head_job(model, tmp_path, settings, progress=False)
    table = T.merge_head_parts([tmp_path])
    tokens = sinks.sink_tokens(model, T._text_prompts(settings), 12)
    alpha = sinks.attention_alpha(model, tokens)
    torch.testing.assert_close(torch.tensor(table.sink_score.to_numpy()), alpha[..., 0].mean(0).flatten(), atol=1e-6, rtol=0)
    _, norm = importance.head_importance_scores(model, tokens, batch_size=1)
    torch.testing.assert_close(torch.tensor(table.importance.to_numpy()), norm.flatten().double(), atol=1e-5, rtol=1e-4)
    assert table.ablation_delta.abs().max() > 0


def test_sink_columns_are_sinks_own_summary(model, tmp_path, monkeypatch):
    """sink_score, sink_share, is_sink and n_secondary_sinks are sinks.sink_scores' columns on the same prompts,
    with sinks.MIN_QUERIES (a length of 24 leaves keys 1..8 seen by >= 16 queries)."""
    settings = T.HeadJobSettings(**{**SETTINGS, "length": 24, "analyses": ("sink",), "secondary_threshold": 0.05})
    T.run_head_job(model, tmp_path / "a", settings, progress=False)
    table = T.merge_head_parts([tmp_path / "a"])
    alpha = sinks.attention_alpha(model, sinks.sink_tokens(model, T._text_prompts(settings), 24))
    expected = sinks.sink_scores(alpha, settings.eps, settings.secondary_threshold)
    for ours, theirs in (("sink_score", "sink_score"), ("sink_share", "sink_share"), ("n_secondary_sinks", "n_secondary")):
        torch.testing.assert_close(torch.tensor(table[ours].to_numpy()), torch.tensor(expected[theirs].to_numpy()), atol=1e-12, rtol=0)
    assert table.is_sink.tolist() == expected.is_sink.tolist()
    assert table.n_secondary_sinks.max() > 0  # the check above compares something
    monkeypatch.setattr(sinks, "MIN_QUERIES", 24)  # no key is seen by 24 queries but key 0
    T.run_head_job(model, tmp_path / "b", settings, progress=False)
    assert T.merge_head_parts([tmp_path / "b"]).n_secondary_sinks.max() == 0


def test_retrieval_columns_are_retrievals_own_summary(monkeypatch):
    g = torch.Generator().manual_seed(0)
    per_sample = torch.rand(4, 2, 3, generator=g, dtype=torch.float64) * 0.3
    counted = [True, False, True, True]
    items = [{"score": per_sample[i], "counted": torch.tensor([c])} for i, c in enumerate(counted)]
    columns = T._scores("retrieval", items, {})
    frame = retrieval.scores_frame(per_sample, counted)
    assert torch.equal(columns["retrieval_score"].flatten(), torch.tensor(frame.retrieval_score.to_numpy()))
    assert columns["is_retrieval_head"].flatten().tolist() == (frame.retrieval_score > retrieval.THRESHOLD).tolist()
    assert bool((columns["retrieval_samples_counted"] == 3).all())
    monkeypatch.setattr(retrieval, "THRESHOLD", 0.2)
    assert columns["is_retrieval_head"].tolist() != T._scores("retrieval", items, {})["is_retrieval_head"].tolist()
    none = T._scores("retrieval", [{**x, "counted": torch.tensor([False])} for x in items], {})
    assert bool(none["retrieval_score"].isnan().all()) and not bool(none["is_retrieval_head"].any())


def test_importance_columns_use_importances_normalisation(model, tmp_path):
    raw = torch.rand(2, 4, dtype=torch.float64)
    items = [{"abs_grad": raw}, {"abs_grad": raw * 3}]
    columns = T._scores("importance", items, {})
    assert torch.equal(columns["importance_raw"], raw * 2)
    assert torch.equal(columns["importance"], importance.normalise_per_layer(raw * 2))


def test_a_killed_job_resumes_without_recomputing(model, tmp_path, monkeypatch):
    settings = T.HeadJobSettings(**SETTINGS)
    real_work = T._work
    calls = []

    def dying_work(model, settings, analysis):
        work = real_work(model, settings, analysis)

        def compute(i):
            if analysis == "ablation" and i == 3:
                raise KeyboardInterrupt("killed")
            calls.append((analysis, i))
            return work.compute(i)
        return T.Work(work.n_items, compute)

    monkeypatch.setattr(T, "_work", dying_work)
    with pytest.raises(KeyboardInterrupt):
        T.run_head_job(model, tmp_path / "job", settings, progress=False)
    assert sorted(p.stem for p in (tmp_path / "job" / "sink").iterdir()) == [f"{i:06d}" for i in range(5)]
    assert len(list((tmp_path / "job" / "ablation").glob("*.safetensors"))) == 3
    monkeypatch.setattr(T, "_work", real_work)
    done = T.run_head_job(model, tmp_path / "job", settings, progress=False)
    assert done == {"sink": 0, "ablation": 2, "importance": 5}
    T.run_head_job(model, tmp_path / "fresh", settings, progress=False)
    pd.testing.assert_frame_equal(T.merge_head_parts([tmp_path / "job"]), T.merge_head_parts([tmp_path / "fresh"]), check_exact=True)


def test_a_different_job_is_refused_not_mixed(model, tmp_path):
    T.run_head_job(model, tmp_path, T.HeadJobSettings(**SETTINGS), progress=False)
    with pytest.raises(CacheError, match="different settings"):
        T.run_head_job(model, tmp_path, T.HeadJobSettings(**{**SETTINGS, "length": 10}), progress=False)
    with pytest.raises(ValueError, match="unknown analyses"):
        T.HeadJobSettings(analyses=("sinks",))
    with pytest.raises(ValueError, match="i/n"):
        T.parse_shard("1of2")


@pytest.mark.bundled
def test_cli_shards_merge_and_retrieval_on_smollm2(smollm, tmp_path, capsys):
    common = ["smollm2-135m", "--analyses", "sink,retrieval", "--prompts", "2", "--length", "32",
              "--niah-lengths", "200", "--niah-depths", "0.5,1", "--quiet"]
    assert main(["heads", *common, "--out", str(tmp_path / "one.csv")]) == 0
    assert main(["heads", *common, "--out", str(tmp_path / "a.parquet"), "--shard", "0/2"]) == 0
    assert "interp merge" in capsys.readouterr().out
    assert main(["heads", *common, "--out", str(tmp_path / "b.parquet"), "--shard", "1/2"]) == 0
    assert main(["merge", str(tmp_path / "a.parquet.parts"), str(tmp_path / "b.parquet.parts"), "--out", str(tmp_path / "m.parquet")]) == 0
    one, merged = pd.read_csv(tmp_path / "one.csv"), pd.read_parquet(tmp_path / "m.parquet")
    assert len(one) == 270
    pd.testing.assert_frame_equal(merged, one, check_exact=False, rtol=1e-12, atol=0)
    assert {"retrieval_score", "is_retrieval_head", "sink_score"} <= set(one.columns)
    # A second run finds everything done.
    assert main(["heads", *common, "--out", str(tmp_path / "one.csv")]) == 0
    assert "sink 0, retrieval 0" in capsys.readouterr().out


def test_long_context_sink_prompts_are_windows_of_offline_prose(model, tmp_path):
    """--max-tokens: the sink analysis reads N-token windows of the pydoc corpus, on the kernel path,
    and gives sinks' own numbers on those tokens (the eager pattern path as the oracle)."""
    settings = T.HeadJobSettings(analyses=("sink",), n_prompts=2, length=12, max_tokens=40)
    T.run_head_job(model, tmp_path, settings, progress=False)
    table = T.merge_head_parts([tmp_path])
    tokens = T.long_sink_tokens(model, 40, 2)
    assert tokens.shape == (2, 40)
    alpha = sinks.attention_alpha(model, tokens, backend="eager")
    torch.testing.assert_close(torch.tensor(table.sink_score.to_numpy()), alpha[..., 0].mean(0).flatten(), atol=1e-5, rtol=0)
    assert json.loads(table.settings[0])["max_tokens"] == 40
    with pytest.raises(ValueError, match="max_tokens: 2 is too short"):
        T.HeadJobSettings(analyses=("sink",), max_tokens=2)


def test_cli_max_tokens_sets_the_niah_length_and_is_checked(tmp_path, capsys):
    from interp.cli import _head_settings, build_parser

    args = build_parser().parse_args(["heads", "m", "--out", "t.csv", "--analyses", "sink,retrieval", "--max-tokens", "4096"])
    settings = _head_settings(args)
    assert settings.max_tokens == 4096 and settings.niah_lengths == (4096,)
    args = build_parser().parse_args(["heads", "m", "--out", "t.csv", "--max-tokens", "4096", "--niah-lengths", "1024,2048"])
    assert _head_settings(args).niah_lengths == (1024, 2048)
    assert main(["heads", "m", "--out", str(tmp_path / "t.csv"), "--max-tokens", "2"]) == 2
    assert "--max-tokens: 2 is too short" in capsys.readouterr().err


def test_long_context_windows_are_consecutive_prose_under_a_real_tokenizer(smollm):
    tokens = T.long_sink_tokens(smollm, 512, 3)
    assert tokens.shape == (3, 512) and len({tuple(t.tolist()) for t in tokens}) == 3
    text = smollm.tokenizer.decode(tokens[0])
    assert text.count(" the ") > 5  # English prose (pydoc topics), not filler
