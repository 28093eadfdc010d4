"""Position-bias metrics and PriDe against hand-worked cases (interp.mcq.bias)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp.mcq import LetterTable, build_prompts, consistency, estimate_prior, parse_questions, pride, recalls, rstd, selection_rates, summarize


def table(logits, gold_letter_at_shift0=None) -> LetterTable:
    """A table over all 4 cyclic shifts; question q's right answer is stored at option index gold0[q]."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    q, s, n = logits.shape
    gold0 = torch.zeros(q, dtype=torch.long) if gold_letter_at_shift0 is None else torch.as_tensor(gold_letter_at_shift0)
    shift = torch.arange(s).repeat(q, 1)
    return LetterTable(logits, (gold0[:, None] - shift) % n, shift)


def test_always_a_hand_worked():
    # A model that always answers A: over the 4 cyclic shifts the answer is at A once, so accuracy 1/4,
    # recalls [1, 0, 0, 0], RStd = std([1, 0, 0, 0]) = sqrt(3)/4, and the chosen content changes every shift.
    logits = torch.zeros(3, 4, 4)
    logits[..., 0] = 1
    s = summarize(table(logits))
    assert s.accuracy == 0.25
    assert s.selection == [1.0, 0.0, 0.0, 0.0]
    assert s.recall == [1.0, 0.0, 0.0, 0.0]
    assert s.rstd == pytest.approx(math.sqrt(3) / 4)
    assert s.consistency == 0.0
    assert s.favoured() == 0


def test_perfect_model_has_no_bias():
    t = table(torch.zeros(5, 4, 4), torch.tensor([0, 1, 2, 3, 1]))
    logits = torch.nn.functional.one_hot(t.gold, 4).float() * 3
    s = summarize(LetterTable(logits, t.gold, t.shift))
    assert s.accuracy == 1.0 and s.rstd == 0.0 and s.consistency == 1.0
    assert s.selection == [0.25] * 4


def test_metric_functions_small_case():
    pred = torch.tensor([[0, 1, 1, 1], [2, 1, 0, 3]])
    gold = torch.tensor([[0, 3, 2, 1], [1, 0, 3, 2]])
    shift = torch.arange(4).repeat(2, 1)
    assert selection_rates(pred, 4).tolist() == [2 / 8, 4 / 8, 1 / 8, 1 / 8]
    # gold at A: (0,0) right, (1,1) wrong -> 1/2; at B: (0,3) right, (1,0) wrong -> 1/2; at C: (0,2) wrong, (1,3) wrong -> 0;
    # at D: (0,1) wrong, (1,2) wrong -> 0
    assert recalls(pred, gold, 4).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert rstd(pred, gold, 4) == pytest.approx(np.std([0.5, 0.5, 0, 0]))
    # chosen content (pred + shift) % 4: q0 -> 0, 2, 3, 0 (not consistent); q1 -> 2, 2, 2, 2 (consistent)
    assert consistency(pred, shift, 4) == 0.5


def test_rstd_skips_letters_never_right():
    pred = torch.tensor([0, 0, 1])
    gold = torch.tensor([0, 1, 1])  # C and D are never the answer
    assert rstd(pred, gold, 4) == pytest.approx(np.std([1.0, 0.5]))


def factorised(n_q: int = 40, seed: int = 0):
    """A logit table that factorises exactly: log prior(letter) + content score (the right option +1.2)."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.tensor([0.55, 0.15, 0.2, 0.1])
    gold0 = torch.randint(0, 4, (n_q,), generator=g)
    content = torch.randn(n_q, 4, generator=g) * 0.3  # per option (stored order)
    content[torch.arange(n_q), gold0] += 1.2
    shift = torch.arange(4)
    option_at = (torch.arange(4)[None] + shift[:, None]) % 4  # [shift, letter] -> option index
    logits = prior.log()[None, None] + content[:, option_at]  # [q, shift, letter]
    return table(logits, gold0), prior, content


def test_pride_recovers_a_known_prior_exactly():
    t, prior, content = factorised()
    est = estimate_prior(t.subset([0, 1]))  # every cyclic shift of two questions
    assert torch.allclose(est, prior, atol=1e-5)
    res = pride(t, estimation=[0, 1])
    assert res.held_out == list(range(2, 40))
    # after dividing the prior out, the choice is the content's argmax at every shift: fully consistent, no bias
    best = content.argmax(1)[2:]
    assert res.after.consistency == 1.0
    assert res.after.accuracy == pytest.approx(float((best == t.gold[2:, 0]).double().mean()))
    assert res.after.rstd == 0.0
    assert res.before.selection[0] > 0.5 and res.before.rstd > 0.1
    assert res.after.accuracy > res.before.accuracy


def test_pride_prob_average_and_split():
    t, prior, _ = factorised()
    res = pride(t, share=0.05, seed=3, average="prob")
    assert len(res.estimation) == 2 and len(res.held_out) == 38  # ceil(0.05 * 40)
    assert sorted(res.estimation + res.held_out) == list(range(40))
    assert sum(res.prior) == pytest.approx(1.0)
    assert res.after.rstd < res.before.rstd


def test_prior_needs_every_shift():
    t, _, _ = factorised(4)
    part = LetterTable(t.logits[:, :2], t.gold[:, :2], t.shift[:, :2])
    with pytest.raises(ValueError, match="every cyclic shift"):
        estimate_prior(part)
    with pytest.raises(ValueError, match="average"):
        pride(t, average="median")


def test_table_from_prompts_layout():
    qs = parse_questions([{"question": "q1", "options": ["a", "b", "c", "d"], "answer": 2},
                          {"question": "q2", "options": ["e", "f", "g", "h"], "answer": 0}])
    ps = build_prompts(qs)
    t = LetterTable.from_prompts(ps, torch.zeros(len(ps), 4))
    assert t.logits.shape == (2, 4, 4)
    assert t.gold.tolist() == [[2, 1, 0, 3], [0, 3, 2, 1]]
    with pytest.raises(ValueError, match="logit rows"):
        LetterTable.from_prompts(ps, torch.zeros(3, 4))
