"""IOI prompt pairs (circuits/tasks/ioi.py) and the PromptPairs type (circuits/tasks/base.py)."""

from __future__ import annotations

import pytest
import torch

from interp.circuits.tasks.base import PromptPairs, check_task
from interp.circuits.tasks.ioi import ioi_names, ioi_prompts, ioi_templates, single_token_words

from conftest import make_tiny, word_tokenizer

# Word-tokenizer words: w4..w9 and w40..w99 are single tokens (w10 splits into the special w1 + w0).
NAMES = [f"w{i}" for i in range(40, 50)]
TEMPLATE = "w50 w51 [IO] w52 [S] w53 w54 [PLACE] w55 [S] w56 [OBJECT] w57"
WORDS = dict(names=NAMES, places=["w60", "w61"], objects=["w70", "w71"])


def word_pairs(n=6, seed=0, **kw):
    return ioi_prompts(word_tokenizer(), n, seed=seed, templates=kw.pop("templates", [TEMPLATE]), **{**WORDS, **kw})


def test_word_tokenizer_layout_by_hand():
    p = word_pairs(n=6)
    assert p.clean_tokens.shape == p.corrupted_tokens.shape == (6, 13)
    # ABBA (even prompts): IO at 2, S1 at 4; BABA (odd): swapped. S2 at 9, the answer read at 12.
    assert p.positions["IO"].tolist() == [2, 4] * 3
    assert p.positions["S1"].tolist() == [4, 2] * 3
    assert p.positions["S2"].tolist() == [9] * 6 and p.positions["END"].tolist() == [12] * 6
    names = {40 + i for i in range(10)}
    for i in range(6):
        row, bad = p.clean_tokens[i], p.corrupted_tokens[i]
        io, s = p.answer_tokens[i].tolist()
        assert io != s and {io, s} <= names
        assert row[p.positions["IO"][i]] == io and row[p.positions["S1"][i]] == s and row[p.positions["S2"][i]] == s
        # template words sit where the template put them
        assert row[[0, 1, 3, 5, 6, 8, 10, 12]].tolist() == [50, 51, 52, 53, 54, 55, 56, 57]
        assert int(row[7]) in (60, 61) and int(row[11]) in (70, 71)
        # corrupted = clean with S2 replaced by a third name
        differ = (row != bad).nonzero().flatten().tolist()
        assert differ == [9] and int(bad[9]) in names - {io, s}
        assert p.clean_prompts[i].split()[9] == f"w{s}" and p.corrupted_prompts[i].split()[9] == f"w{int(bad[9])}"


def test_seed_is_deterministic():
    a, b, c = word_pairs(seed=3), word_pairs(seed=3), word_pairs(seed=4)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.corrupted_tokens, b.corrupted_tokens)
    assert not torch.equal(a.clean_tokens, c.clean_tokens)


def test_orders():
    assert word_pairs(order="ABBA").positions["IO"].tolist() == [2] * 6
    assert word_pairs(order="BABA").positions["IO"].tolist() == [4] * 6
    with pytest.raises(ValueError, match="order"):
        word_pairs(order="AB")


def test_templates_of_equal_length_mix_and_unequal_ones_fail():
    other = "w58 [IO] w52 [S] w53 w54 [PLACE] w55 w59 [S] w56 [OBJECT] w57"  # same length, other layout
    p = word_pairs(n=4, templates=[TEMPLATE, other], order="ABBA")
    assert p.positions["IO"].tolist() == [2, 1, 2, 1] and p.positions["S2"].tolist() == [9, 9, 9, 9]
    longer = TEMPLATE + " w58"
    with pytest.raises(ValueError, match="different token lengths") as e:
        word_pairs(n=4, templates=[TEMPLATE, longer])
    assert "13 tokens" in str(e.value) and "14 tokens" in str(e.value)


@pytest.mark.parametrize("bad", ["Mary", "w10"])  # Mary is the unknown token; w10 is two tokens
def test_multi_token_or_unknown_names_are_refused(bad):
    with pytest.raises(ValueError, match="not one token") as e:
        word_pairs(names=NAMES[:5] + [bad])
    assert repr(bad) in str(e.value)


def test_bad_templates_are_refused():
    with pytest.raises(ValueError, match=r"one \[IO\] and two \[S\]"):
        word_pairs(templates=["w50 [IO] w51 [S] w52 w53"])
    with pytest.raises(ValueError, match="must follow a space"):
        word_pairs(templates=["w50 [IO] w51 [S] w52 w53,[S] w54"])
    with pytest.raises(ValueError, match="unknown slot"):
        word_pairs(templates=["w50 [IO] w51 [S] w52 [X] w53 [S] w54"])


def test_default_lists_need_single_token_names():
    tok = word_tokenizer()
    assert single_token_words(tok, ioi_names()) == []  # no English name is a w-word
    with pytest.raises(ValueError, match="pass names="):
        ioi_prompts(tok, 4, templates=[TEMPLATE], places=WORDS["places"], objects=WORDS["objects"])


def test_prompt_pairs_validation_shows_shapes():
    t = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(3, 5\) vs corrupted_tokens \(3, 6\)"):
        PromptPairs(t, torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[n, 2\].*got shape \(3, 3\)"):
        PromptPairs(t, t, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PromptPairs(t, t, torch.full((3, 2), 100), d_vocab=100)
    with pytest.raises(TypeError, match="torch.long"):
        PromptPairs(t.float(), t, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        PromptPairs(t, t, torch.zeros(3, 2, dtype=torch.long), positions={"END": torch.tensor([5, 5, 5])})


def test_logit_diff_by_hand():
    p = PromptPairs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 2], [3, 0]]))
    logits = torch.zeros(2, 3, 4)
    logits[0, -1] = torch.tensor([0.0, 5.0, 1.5, 0.0])
    logits[1, -1] = torch.tensor([2.0, 0.0, 0.0, -1.0])
    logits[:, 0] = 100.0  # not the final position: ignored
    assert p.logit_diff(logits).tolist() == [3.5, -3.0]
    assert p.logit_diff(logits[:, -1]).tolist() == [3.5, -3.0]
    assert float(p.metric(logits)) == 0.25
    with pytest.raises(ValueError, match=r"n = 2 prompts, got shape \(3, 4\)"):
        p.logit_diff(torch.zeros(3, 4))
    sub = p[[1]]
    assert sub.answer_tokens.tolist() == [[3, 0]] and len(sub) == 1


def test_check_task_matches_direct_logits():
    model = make_tiny("llama")
    p = word_pairs(n=8)
    got = check_task(model, p, batch_size=3)  # batches that do not divide n
    with torch.no_grad():
        clean = model(p.clean_tokens)[:, -1]
        bad = model(p.corrupted_tokens)[:, -1]
    a = p.answer_tokens
    d_clean = clean.gather(1, a)[:, 0] - clean.gather(1, a)[:, 1]
    d_bad = bad.gather(1, a)[:, 0] - bad.gather(1, a)[:, 1]
    assert got["accuracy"] == pytest.approx(float((d_clean > 0).float().mean()))
    assert got["clean_logit_diff"] == pytest.approx(float(d_clean.mean()), abs=1e-5)
    assert got["corrupted_logit_diff"] == pytest.approx(float(d_bad.mean()), abs=1e-5)


@pytest.mark.bundled
def test_smollm2_prompts(smollm):
    tok = smollm.tokenizer
    p = ioi_prompts(tok, 32, seed=0)
    assert torch.equal(ioi_prompts(smollm, 32, seed=0).clean_tokens, p.clean_tokens)  # a model stands for its tokenizer
    assert p.clean_tokens.shape == p.corrupted_tokens.shape == (32, 14)
    for i in range(32):
        io, s = (tok.decode([t]) for t in p.answer_tokens[i].tolist())
        assert io.startswith(" ") and s.startswith(" ") and io != s
        assert f" {io.strip()} and" in p.clean_prompts[i] or f"and {io.strip()} went" in p.clean_prompts[i]
        assert p.clean_prompts[i].count(s.strip()) == 2 and p.corrupted_prompts[i].count(s.strip()) == 1
        assert smollm.to_tokens(p.clean_prompts[i])[0].tolist() == p.clean_tokens[i].tolist()
    # every shipped template works with this tokenizer; they do not all have one length
    lengths = {ioi_prompts(tok, 2, templates=[t]).n_pos for t in ioi_templates()}
    assert len(lengths) > 1
    with pytest.raises(ValueError, match="different token lengths"):
        ioi_prompts(tok, 8, templates=ioi_templates())


@pytest.mark.bundled
def test_smollm2_does_ioi(smollm):
    # Measured: accuracy 1.0, mean logit diff 5.38 clean, 0.38 corrupted (32 prompts, seed 0).
    result = check_task(smollm, ioi_prompts(smollm.tokenizer, 32, seed=0))
    assert result["accuracy"] >= 0.9
    assert result["clean_logit_diff"] > 3.0
    assert abs(result["corrupted_logit_diff"]) < 1.0
