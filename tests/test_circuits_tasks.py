"""Tasks beside IOI: induction, greater-than, factual recall, multiple choice."""

import pytest
import torch

from interp.circuits.tasks.base import check_task
from interp.circuits.tasks.factual import factual_facts, factual_prompts
from interp.circuits.tasks.greater_than import greater_than_prompts
from interp.circuits.tasks.induction import induction_loss, induction_prompts, induction_scores
from interp.circuits.tasks.multiple_choice import multiple_choice_prompts

from conftest import word_tokenizer


def test_induction_layout_and_metric():
    t = induction_prompts(word_tokenizer(), 3, length=5, seed=1, low=4, high=100)
    assert t.clean_tokens.shape == (3, 11) and int(t.clean_tokens[0, 0]) == 2  # BOS w2 first
    assert torch.equal(t.clean_tokens[:, 1:6], t.clean_tokens[:, 6:])
    assert torch.equal(t.corrupted_tokens[:, 6:], t.clean_tokens[:, 6:])
    assert not torch.equal(t.corrupted_tokens[:, 1:6], t.clean_tokens[:, 1:6])
    assert torch.equal(induction_prompts(word_tokenizer(), 3, length=5, seed=1, low=4, high=100).clean_tokens, t.clean_tokens)
    # metric: mean log p over positions 5..9 predicting tokens 6..10, by hand
    logits = torch.randn(3, 11, 100)
    lp = logits.log_softmax(-1)
    want = torch.stack([lp[b, p, t.clean_tokens[b, p + 1]] for b in range(3) for p in range(5, 10)]).mean()
    torch.testing.assert_close(t.metric(logits), want)
    assert t[[0, 2]].length == 5 and len(t[[0, 2]]) == 2
    with pytest.raises(ValueError, match="token ids"):
        induction_prompts(word_tokenizer(), 1, length=60, low=4, high=100)


def test_greater_than_metric_by_hand():
    import re
    import zlib

    class Digits:  # digits are tokens 0-9 (one per digit, as SmolLM2 writes numbers), " word" pieces 10+
        def __len__(self):
            return 200

        def encode(self, s, add_special_tokens=False):
            return [int(w) if w.isdigit() else 10 + zlib.crc32(w.encode()) % 190 for w in re.findall(r"\d| ?[^\d\s]+", s)]

        def __call__(self, s, add_special_tokens=True):
            return {"input_ids": self.encode(s)}

    t = greater_than_prompts(Digits(), 4, seed=0, nouns=("x",))
    logits = torch.zeros(4, 200)
    logits[:, :10] = torch.randn(4, 10)
    p = logits.softmax(-1)[:, :10]
    want = torch.stack([p[i, t.tens[i] + 1 :].sum() - p[i, : t.tens[i]].sum() for i in range(4)]).mean()
    torch.testing.assert_close(t.metric(logits), want)
    assert all("17" + str(int(d)) in s for d, s in zip(t.tens, t.clean_prompts))
    assert all("1701" in s for s in t.corrupted_prompts)


@pytest.mark.bundled
def test_tasks_on_smollm(smollm):
    tok = smollm.tokenizer
    gt = greater_than_prompts(tok, 16)
    assert check_task(smollm, gt)["accuracy"] >= 0.8
    with torch.no_grad():
        assert float(gt.metric(smollm(gt.clean_tokens))) > float(gt.metric(smollm(gt.corrupted_tokens))) + 0.5
    known = factual_facts(tok, smollm)
    assert len(known) >= 10 and ("The capital of {} is", "France", "Paris") in known
    fa = factual_prompts(tok, 16, model=smollm)
    assert check_task(smollm, fa)["accuracy"] == 1.0
    ind = induction_prompts(tok, 4, length=20)
    loss = induction_loss(smollm, ind)
    assert loss["loss_drop"] > 3.0
    mc = multiple_choice_prompts(tok, 8)
    assert mc.clean_tokens.shape == mc.corrupted_tokens.shape
    assert not torch.equal(mc.answer_tokens[:, 0], mc.answer_tokens[:, 1])


@pytest.mark.bundled
def test_induction_heads_on_smollm(smollm):
    """The induction heads: high induction score, and ablating them removes most of the in-context loss drop."""
    from interp.heads.ablation import ablate_heads

    task = induction_prompts(smollm.tokenizer, 4, length=20)
    scores = induction_scores(smollm, task).sort_values("induction_score", ascending=False)
    top = [(int(r.layer), int(r.head)) for r in scores.head(6).itertuples()]
    assert scores.induction_score.iloc[0] > 0.5
    before = induction_loss(smollm, task)["loss_drop"]
    with ablate_heads(smollm, top, how="mean", reference=task.corrupted_tokens):
        after = induction_loss(smollm, task)["loss_drop"]
    assert after < 0.5 * before
