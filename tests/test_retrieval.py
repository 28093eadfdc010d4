"""Retrieval scores (Wu et al. 2024) and the NIAH harness, on tiny models with scripted decodes."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from interp.data.haystack import Haystack
from interp.heads.niah import greedy_decode, rouge1_recall, run_niah
from interp.heads.retrieval import (
    PatternHookArgmax,
    copy_event_scores,
    retrieval_ablation_curves,
    retrieval_heads,
    score_retrieval,
    scores_frame,
)

from conftest import VOCAB, make_tiny


# ------------------------------------------------------------------ ROUGE-1 recall, hand-worked
@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("48213.", "48213", 1.0),
        (" 48213. The", "48213", 1.0),
        ("48215", "48213", 0.0),
        # ref unigrams eat a sandwich and sit in dolores park (8); pred shares eat a sandwich in park (5)
        ("Eat a sandwich in the park", "eat a sandwich and sit in Dolores Park", 5 / 8),
        # counts are clipped: ref has "the" twice, pred three times -> 2 of 3
        ("the the the", "the cat the", 2 / 3),
        ("anything", "", 0.0),
    ],
)
def test_rouge1_recall(pred, ref, expected):
    assert rouge1_recall(pred, ref) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ copy events, hand-worked
def test_copy_event_scores_hand_example():
    prompt = [9, 9, 4, 5, 4, 9, 5]  # needle span [2, 5) = tokens 4 5 4; a 5 also outside at 6
    generated = [4, 5, 4]
    # argmax[step, layer, head]; 1 layer, 4 heads
    argmax = torch.tensor(
        [
            [[2, 4, 3, 0]],  # gen 4: head0 -> pos2 (4, in span) yes; head1 -> pos4 (4) yes; head2 -> 5 no; head3 out
            [[3, 6, 3, 3]],  # gen 5: head0 yes; head1 -> pos6 is 5 but outside span: no; head2 yes; head3 yes
            [[2, 3, 7, 4]],  # gen 4: head0 yes; head1 -> 5 no; head2 -> pos7 (a generated token): no; head3 yes
        ]
    )
    got = copy_event_scores(argmax, generated, prompt, (2, 5))
    assert got.dtype == torch.float64
    assert got.tolist() == [[3 / 3, 1 / 3, 1 / 3, 2 / 3]]


def test_copy_event_scores_bad_input():
    with pytest.raises(ValueError, match="steps"):
        copy_event_scores(torch.zeros(2, 1, 1, dtype=torch.long), [1, 2, 3], [1, 2, 3], (0, 1))
    with pytest.raises(ValueError, match="span"):
        copy_event_scores(torch.zeros(1, 1, 1, dtype=torch.long), [1], [1, 2, 3], (2, 5))


def test_scores_frame_means_over_counted_samples_only():
    per = torch.tensor([[[0.2, 0.4]], [[1.0, 1.0]], [[0.0, 0.2]]], dtype=torch.float64)
    df = scores_frame(per, [True, False, True])
    assert df.retrieval_score.tolist() == pytest.approx([0.1, 0.3])
    assert list(df.columns) == ["layer", "head", "retrieval_score", "n_counted"]
    assert (df.n_counted == 2).all()
    assert retrieval_heads(df)[["layer", "head"]].values.tolist() == [[0, 1]]  # 0.1 is not > 0.1
    assert scores_frame(per, [False] * 3).retrieval_score.isna().all()


# ------------------------------------------------------------------ the scripted decode
T, STEPS = 16, 5
SPAN = (5, 9)
NEEDLE = [10, 11, 12, 10]  # w10 occurs twice: either copy counts (Wu et al. compare tokens)
EOS = 3


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    ids = [rng.randrange(20, VOCAB) for _ in range(T)]
    ids[SPAN[0] : SPAN[1]] = NEEDLE
    ids[2] = 11  # the token w11 outside the needle: attending there is no copy event
    return ids


def _achievable(model) -> list[int]:
    """Tokens t for which final-norm output = W_U[t] makes the greedy pick t."""
    W = model.hf_model.get_output_embeddings().weight.detach()
    logits = W @ W.T
    return [t for t in range(VOCAB) if int(logits[t].argmax()) == t]


def test_scripted_decode_scores_equal_float64_reference():
    """Force the generated tokens (final-norm edit) and every head's decode-step pattern (one-hot
    edit); the harness must read those argmaxes and score them exactly as a loop in float64 does."""
    model = make_tiny("llama")
    ok = set(_achievable(model))
    scripts = [[10, 11, 12, 10, EOS], [50, 51, 52, 53, 54]]  # sample 0 answers right, sample 1 wrong
    assert all(t in ok for s in scripts for t in s), "pick other scripted tokens: these are not reachable"
    prompts = [_prompt(0), _prompt(1)]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    rng = random.Random(0)
    # positions[step][b][layer][head]: mostly inside the needle so that events happen, some anywhere
    positions = [
        [[[rng.randrange(*SPAN) if rng.random() < 0.6 else rng.randrange(T + s) for _ in range(H)] for _ in range(L)] for _ in range(2)]
        for s in range(STEPS)
    ]
    for s, tok in enumerate(scripts[0]):  # head (0, 0) of sample 0 copies the generated token at every step
        if tok in NEEDLE:
            positions[s][0][0][0] = SPAN[0] + (0 if tok == 10 else NEEDLE.index(tok))
    positions[1][0][0][1] = 2  # head (0, 1) points at w11 outside the needle when w11 is generated

    W = model.hf_model.get_output_embeddings().weight.detach()
    step = {"n": 0}

    def force_pattern(p, hook):
        if p.shape[2] != 1:  # the prefill: leave it alone
            return None
        out = torch.zeros_like(p)
        for b in range(p.shape[0]):
            for h in range(p.shape[1]):
                out[b, h, 0, positions[step["n"]][b][hook.layer()][h]] = 1.0
        return out

    def force_token(x, hook):
        if x.shape[1] != 1:
            return None
        out = torch.stack([W[scripts[b][step["n"]]] for b in range(x.shape[0])])[:, None] * 10.0
        step["n"] += 1
        return out

    samples = [
        Haystack(input_ids=p, needle_span=SPAN, answer_span=SPAN, depth=0.3, actual_depth=0.3,
                 answer="w10 w11 w12 w10", seed=i)
        for i, p in enumerate(prompts)
    ]
    hooks = [(f"blocks.{l}.attn.hook_pattern", force_pattern) for l in range(L)] + [("ln_final.hook_normalized", force_token)]
    with model.hooks(fwd_hooks=hooks):
        res = score_retrieval(model, samples, max_new_tokens=STEPS)

    assert res.samples.generated.tolist() == [scripts[0], scripts[1]]  # the token forcing worked
    assert res.samples.correct.tolist() == [True, False]
    assert res.samples.n_steps.tolist() == [5, 5]

    expected = torch.zeros(2, L, H, dtype=torch.float64)
    for b in range(2):
        for l in range(L):
            for h in range(H):
                events = sum(
                    1 for s in range(STEPS)
                    if SPAN[0] <= positions[s][b][l][h] < SPAN[1] and prompts[b][positions[s][b][l][h]] == scripts[b][s]
                )
                expected[b, l, h] = events / (SPAN[1] - SPAN[0])
    assert expected[0, 0, 0] == 1.0 and expected.sum() > 1.0  # the script has events to find
    assert torch.equal(res.per_sample, expected)
    table = res.scores.set_index(["layer", "head"]).retrieval_score
    for l in range(L):
        for h in range(H):
            assert table[(l, h)] == expected[0, l, h]  # only the correct sample counts
    assert (res.scores.n_counted == 1).all()


# ------------------------------------------------------------------ decode rows = rows of the full pattern
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_decode_argmax_equals_full_pattern_rows(family):
    """KV-cache decode with a pattern hook (eager, q_len 1) sees the same rows as one full forward,
    and generates the same tokens as the SDPA path (checks the decode-time mask)."""
    model = make_tiny(family)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (2, 12), generator=g)
    steps = 4
    dec = greedy_decode(model, ids, steps, PatternHookArgmax(model))
    plain = greedy_decode(model, ids, steps)
    assert torch.equal(dec.tokens, plain.tokens)
    full = torch.cat([ids, dec.tokens[:, :-1]], 1)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(full, names_filter=names)
    q = torch.arange(ids.shape[1] - 1, full.shape[1])  # the query positions of the decode steps
    assert torch.equal(logits[:, q].argmax(-1), dec.tokens)
    ref = torch.stack([cache[n][:, :, q] for n in names], 2)  # [b, head, layer, step, k]
    ref_argmax = ref.to(torch.float64).argmax(-1).permute(3, 0, 2, 1)  # [step, b, layer, head]
    assert dec.argmax.shape == (steps, 2, model.cfg.n_layers, model.cfg.n_heads)
    assert torch.equal(dec.argmax, ref_argmax)


def test_greedy_decode_rejects_bad_input():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="batch, pos"):
        greedy_decode(model, torch.tensor([1, 2, 3]), 2)


# ------------------------------------------------------------------ ablation curves
def test_ablation_curves_mask_the_ranked_heads():
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(20, VOCAB, (3, 10), generator=g).tolist()
    # answers = what the unablated model says, so the baseline accuracy is 1
    base = greedy_decode(model, torch.tensor(prompts), 2).tokens
    samples = [
        Haystack(input_ids=p, needle_span=(1, 3), answer_span=(1, 3), depth=0.1, actual_depth=0.1,
                 answer=model.tokenizer.decode(base[i].tolist()), seed=i)
        for i, p in enumerate(prompts)
    ]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    score = {(1, 2): 0.9, (0, 3): 0.5}
    scores = pd.DataFrame([dict(layer=l, head=h, retrieval_score=score.get((l, h), 0.0), n_counted=3) for l in range(L) for h in range(H)])
    curves = retrieval_ablation_curves(model, scores, ks=[1, 2], n_random_draws=2, samples=samples, max_new_tokens=2)
    assert list(curves.columns[:3]) == ["k", "kind", "accuracy"]
    assert set(curves.kind) == {"retrieval", "random"}
    assert curves[curves.k == 0].accuracy.tolist() == [1.0, 1.0]
    ret = curves[curves.kind == "retrieval"].set_index("k")
    assert ret.heads[1] == "1.2" and ret.heads[2] == "1.2,0.3"
    for draws in curves[(curves.kind == "random") & (curves.k > 0)].heads:
        for d in draws.split(";"):
            assert not {"1.2", "0.3"} & set(d.split(","))
    # independent check of one point: zero the query of head (1, 2) by hand, HF generate
    def zero_q(q, hook):
        q = q.clone()
        q[:, :, 2] = 0
        return q

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", zero_q)]):
        out = model.generate(torch.tensor(prompts), max_new_tokens=2)[:, 10:]
    manual = sum(rouge1_recall(model.tokenizer.decode(out[i].tolist()), s.answer) > 0.5 for i, s in enumerate(samples)) / 3
    assert ret.accuracy[1] == pytest.approx(manual)
    with pytest.raises(ValueError, match="positive"):
        retrieval_ablation_curves(model, scores, ks=[0], n_random_draws=1, samples=samples)


def test_run_niah_rejects_empty():
    with pytest.raises(ValueError, match="no samples"):
        run_niah(make_tiny("llama"), [], 2)


def test_niah_accuracy_table_and_heatmap():
    from interp.heads.niah import niah_accuracy
    from interp.viz import niah_heatmap

    df = pd.DataFrame(dict(n_tokens=[1024, 1024, 1024, 2048], depth=[0.0, 0.0, 1.0, 0.0], correct=[True, False, True, False]))
    table = niah_accuracy(df)
    assert table.loc[1024, 0.0] == 0.5 and table.loc[1024, 1.0] == 1.0 and table.loc[2048, 0.0] == 0.0
    assert pd.isna(table.loc[2048, 1.0])
    fig = niah_heatmap(table)
    assert fig.data[0].z.shape == (2, 2) and list(fig.data[0].y) == ["1024", "2048"]
