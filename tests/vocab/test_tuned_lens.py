"""Tuned lens (interp/vocab/tuned_lens.py, Belrose et al. 2023): identity at init, training, disk, resume, the lens= hook."""

from __future__ import annotations

import json

import pytest
import torch

from interp.lens import logit_lens_frame, logit_lens_logits
from interp.tuned_lens_cli import check_tuned_lens_path, cmd_tuned_lens_train, load_tuned_lens_arg
from interp.vocab.lens_text import lens_documents, split_documents, token_chunks
from interp.vocab.tuned_lens import (
    CHECKPOINT_NAME,
    PARAMS_NAME,
    TrainConfig,
    TunedLens,
    batch_indices,
    lens_kl_table,
    train_tuned_lens,
)

from conftest import VOCAB, make_hf, make_tiny

CONFIG = TrainConfig(steps=12, batch_size=4, seq_len=16, checkpoint_every=3, seed=0)


def _chunks(seed: int, n: int = 24, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def trained(llama):
    return train_tuned_lens(llama, _chunks(1), CONFIG)


def _random_lens(model, seed: int = 0) -> TunedLens:
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    for p in lens.parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    return lens


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_identity_init_is_the_logit_lens_exactly(family):
    model = make_tiny(family)
    tokens = _chunks(2, n=2, seq_len=7)
    lens = TunedLens.for_model(model)
    plain, _, _ = logit_lens_logits(model, tokens)
    tuned, _, _ = logit_lens_logits(model, tokens, lens=lens)
    assert torch.equal(plain, tuned)
    a, b = logit_lens_frame(model, tokens, top_k=3), logit_lens_frame(model, tokens, top_k=3, lens=lens)
    assert a.equals(b) and b.attrs["metric_name"] == "tuned lens"


def test_final_layer_is_the_models_logits(llama):
    tokens = _chunks(3, n=2, seq_len=6)
    lens = _random_lens(llama)
    logits, _, labels = logit_lens_logits(llama, tokens, lens=lens)
    with torch.no_grad():
        expected = make_hf("llama")(tokens).logits
    assert labels[-1] == "final_post" and torch.equal(logits[-1], expected)
    assert not torch.equal(logits[0], logit_lens_logits(llama, tokens)[0][0])  # the translators are used below it
    frame = logit_lens_frame(llama, tokens, lens=lens)
    assert (frame[frame.layer == llama.cfg.n_layers].kl_to_final == 0).all()
    assert lens.transform(torch.ones(3, llama.cfg.d_model), llama.cfg.n_layers).eq(1).all()  # no translator there


def test_training_lowers_heldout_kl(llama, trained):
    heldout = _chunks(99, n=6)  # other random sequences than the training chunks
    table = lens_kl_table(llama, heldout, {"logit": None, "tuned": trained})
    kl = table.pivot(index="layer", columns="lens", values="kl_to_final")
    assert (kl["tuned"] < kl["logit"]).all(), kl
    assert trained.training_info["steps"] == CONFIG.steps


def test_training_is_deterministic(llama, trained):
    again = train_tuned_lens(llama, _chunks(1), CONFIG)
    for a, b in zip(trained.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_resume_after_interruption_equals_uninterrupted(llama, trained, tmp_path):
    def crash(step, losses):
        if step == 7:  # after steps 0..7: the last checkpoint is after step 6 (every 3 steps)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(llama, _chunks(1), CONFIG, checkpoint_dir=tmp_path, on_step=crash)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    seen = []
    resumed = train_tuned_lens(llama, _chunks(1), CONFIG, checkpoint_dir=tmp_path, on_step=lambda s, _: seen.append(s))
    assert seen == list(range(6, CONFIG.steps))
    for a, b in zip(trained.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_of_another_run_is_refused(llama, tmp_path):
    small = TrainConfig(steps=2, batch_size=2, seq_len=16, checkpoint_every=1)
    train_tuned_lens(llama, _chunks(1), small, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another training run.*config"):
        train_tuned_lens(llama, _chunks(1), TrainConfig(steps=3, batch_size=2, seq_len=16), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another training run.*chunks_sha256"):
        train_tuned_lens(llama, _chunks(5), small, checkpoint_dir=tmp_path)


def test_model_parameters_are_left_trainable(llama):
    before = [p.requires_grad for p in llama.hf_model.parameters()]
    train_tuned_lens(llama, _chunks(1), TrainConfig(steps=1, batch_size=1, seq_len=8))
    assert [p.requires_grad for p in llama.hf_model.parameters()] == before
    assert all(p.grad is None for p in llama.hf_model.parameters())


def test_save_load_roundtrip(llama, trained, tmp_path):
    trained.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens", llama)
    for (na, a), (nb, b) in zip(trained.named_parameters(), loaded.named_parameters()):
        assert na == nb and torch.equal(a, b)
    tokens = _chunks(4, n=1, seq_len=6)
    assert torch.equal(logit_lens_logits(llama, tokens, lens=trained)[0], logit_lens_logits(llama, tokens, lens=loaded)[0])
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config["fingerprint"] == llama.fingerprint() and config["n_layers"] == 2 and config["training"]["steps"] == 12


def test_mismatched_model_is_refused(llama, trained, tmp_path):
    trained.save(tmp_path / "lens")
    other_weights = make_tiny("llama", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        TunedLens.load(tmp_path / "lens", other_weights)
    with pytest.raises(ValueError, match="fingerprint"):
        logit_lens_frame(other_weights, "w5 w6", lens=trained)
    with pytest.raises(ValueError, match="d_model 32 and 2 layers"):
        TunedLens(64, 2, "other").check_model(llama)
    assert TunedLens.load(tmp_path / "lens", other_weights, check_fingerprint=False).n_layers == 2


def test_damaged_or_missing_lens_is_refused(llama, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tuned lens folder"):
        TunedLens.load(tmp_path)
    trained.save(tmp_path / "lens")
    TunedLens.for_model(llama).save(tmp_path / "other")
    (tmp_path / "lens" / PARAMS_NAME).write_bytes((tmp_path / "other" / PARAMS_NAME).read_bytes())
    with pytest.raises(ValueError, match="does not match the sha256"):
        TunedLens.load(tmp_path / "lens")


def test_batches_are_a_function_of_the_step():
    first_epoch = torch.cat([batch_indices(10, s, 5, seed=3) for s in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 3, 5, seed=3), batch_indices(10, 3, 5, seed=3))
    assert not torch.equal(batch_indices(10, 0, 10, seed=3), batch_indices(10, 0, 10, seed=4))


def test_text_split_is_by_topic_and_fixed():
    docs = lens_documents()
    assert len([n for n in docs if n.startswith("pydoc:")]) >= 70 and "prompts:prose" in docs
    train, held = split_documents(docs)
    assert not set(train) & set(held) and set(train) | set(held) == set(docs)
    assert 0.15 < len(held) / len(docs) < 0.25
    assert set(split_documents(dict(reversed(list(docs.items()))))[1]) == set(held)  # not the order: the names
    tokenizer = make_tiny("llama").tokenizer
    chunks = token_chunks(tokenizer, ["w5 w6 w7", "w8 w9"], seq_len=2)
    assert chunks.shape == (2, 2)


def test_cli_train_and_lens_arg(llama, tmp_path, monkeypatch, capsys):
    import argparse

    import interp.tuned_lens_cli as cli

    chunks = _chunks(1)
    monkeypatch.setattr(cli, "_load", lambda args: llama)
    monkeypatch.setattr(cli, "_train_chunks", lambda model, seq_len, seed: chunks[:, :seq_len])
    args = argparse.Namespace(model="tiny", dtype="float32", device=None, out=str(tmp_path / "lens"), steps=3,
                              batch_size=2, seq_len=8, checkpoint_every=2, seed=0, quiet=True)
    with torch.no_grad():  # as `interp`'s main runs every command
        assert cmd_tuned_lens_train(args) == 0
    check_tuned_lens_path(str(tmp_path / "lens"))
    with pytest.raises(ValueError, match="does not exist"):
        check_tuned_lens_path(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json"):
        check_tuned_lens_path(str(tmp_path))
    lens = load_tuned_lens_arg(str(tmp_path / "lens"), llama)
    assert lens.training_info["steps"] == 3 and "wrote" in capsys.readouterr().out
    assert any(p.abs().sum() > 0 for p in lens.parameters())  # it trained under no_grad
    assert load_tuned_lens_arg(None, llama) is None
    with pytest.raises(ValueError, match="fingerprint"):
        load_tuned_lens_arg(str(tmp_path / "lens"), make_tiny("llama", seed=1))


def test_cli_parser():
    import argparse

    from interp.tuned_lens_cli import add_lens_flag, add_tuned_lens_parser

    parser = argparse.ArgumentParser(prog="interp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tuned_lens_parser(sub, lambda p: p.add_argument("model"))
    add_lens_flag(sub.add_parser("lens"))
    args = parser.parse_args(["tuned-lens", "train", "smollm2-135m", "--out", "d", "--steps", "5"])
    assert (args.func, args.model, args.out, args.steps, args.batch_size) == (cmd_tuned_lens_train, "smollm2-135m", "d", 5, 8)
    assert parser.parse_args(["lens", "--tuned-lens", "d"]).tuned_lens == "d"


@pytest.mark.bundled
def test_identity_and_final_layer_smollm2(smollm):
    tokens = smollm.to_tokens("The Eiffel Tower is in the city of")
    lens = TunedLens(smollm.cfg.d_model, smollm.cfg.n_layers)  # no fingerprint: no hashing of the weights
    plain, _, _ = logit_lens_logits(smollm, tokens)
    assert torch.equal(plain, logit_lens_logits(smollm, tokens, lens=lens)[0])
    with torch.no_grad():
        assert torch.equal(plain[-1], smollm.hf_model(tokens, use_cache=False).logits)
