"""Function vectors on tiny models (Todd et al. 2024): prompts, the AIE sweep (batched == naive),
function-vector injection, and head-set ablation helpers."""

from __future__ import annotations

import random

import pytest
import torch

from interp.hook_points import get_act_name
from interp.icl import (
    ICLTask,
    add_at_last_token,
    answer_id,
    average_indirect_effect,
    format_prompt,
    function_vector,
    fv_accuracy_by_layer,
    head_stats,
    last_token_logits,
    length_groups,
    load_tasks,
    make_prompts,
    top_heads,
)
from interp.icl.runs import capture, resume_last
from interp.icl.tasks import derangement

from conftest import make_tiny

# Words from w40 on: the tokenizer's special tokens w1..w3 would split "w1x" words.
TASK = ICLTask("succ", tuple((f"w{i}", f"w{i + 1}") for i in range(40, 89)))


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def test_prompt_format_is_the_papers():
    assert format_prompt([("hot", "cold"), ("up", "down")], "big") == "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
    assert format_prompt([], "big") == "Q: big\nA:"


def test_shuffled_prompts_keep_queries_and_permute_labels(llama):
    clean = make_prompts(llama, TASK, 6, 5, seed=3)
    shuffled = make_prompts(llama, TASK, 6, 5, seed=3, shuffled=True)
    for c, s in zip(clean, shuffled):
        assert (c.query, c.answer, c.answer_id) == (s.query, s.answer, s.answer_id)
        assert c.answer_id == int(c.answer[1:])  # w{i} is token i in the word tokenizer
        demos_c = [blk.split("\nA: ") for blk in c.text.split("\n\n")[:-1]]
        demos_s = [blk.split("\nA: ") for blk in s.text.split("\n\n")[:-1]]
        assert [x for x, _ in demos_c] == [x for x, _ in demos_s]
        assert sorted(y for _, y in demos_c) == sorted(y for _, y in demos_s)
        assert all(yc != ys for (_, yc), (_, ys) in zip(demos_c, demos_s))  # a derangement
        assert c.query not in [x for x, _ in demos_c]
    assert derangement(["a"], random.Random(0)) == ["a"]
    with pytest.raises(ValueError, match="pairs"):
        make_prompts(llama, ICLTask("t", (("w5", "w6"),)), 1, 3)


def test_shipped_tasks_load():
    tasks = load_tasks()
    assert {"antonym", "capitalize", "country_capital", "present_past"} <= set(tasks)
    for t in tasks.values():
        assert 40 <= len(t.pairs) <= 60, t.name
        assert len({x for x, _ in t.pairs}) == len(t.pairs), f"{t.name}: repeated inputs"


def test_length_groups_read_each_prompt_at_its_own_last_token(llama):
    prompts = make_prompts(llama, TASK, 3, 4, seed=0) + make_prompts(llama, TASK, 2, 2, seed=1)
    groups = length_groups(llama, prompts)
    assert sorted(len(g.index) for g in groups) == [2, 3]
    probs, _ = last_token_logits(llama, groups)
    for i, p in enumerate(prompts):
        alone = torch.softmax(llama(p.text)[0, -1].float(), -1)[p.answer_id]
        assert float(probs[i]) == pytest.approx(float(alone), abs=1e-6)


def _setup(model, n=2):
    clean = length_groups(model, make_prompts(model, TASK, n, 4, seed=0) + make_prompts(model, TASK, 2, 3, seed=5))
    corrupt = length_groups(model, make_prompts(model, TASK, n, 4, seed=1, shuffled=True) + make_prompts(model, TASK, 2, 3, seed=6, shuffled=True))
    return head_stats(model, clean), corrupt


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_aie_batched_equals_naive(fam):
    model = make_tiny(fam, seed=2)
    stats, corrupt = _setup(model)
    naive = average_indirect_effect(model, stats.last_mean, corrupt, method="naive")
    batched = average_indirect_effect(model, stats.last_mean, corrupt)
    assert batched.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(batched, naive, atol=1e-6, rtol=0)
    assert float(naive.abs().max()) > 1e-5  # the patches do something
    chunked = average_indirect_effect(model, stats.last_mean, corrupt, batch_heads=3)
    assert torch.allclose(chunked, naive, atol=1e-6, rtol=0)
    some = average_indirect_effect(model, stats.last_mean, corrupt, heads=[(1, 2), (0, 1)])
    assert torch.isnan(some).sum() == some.numel() - 2
    assert torch.allclose(some[1, 2], naive[1, 2], atol=1e-6) and torch.allclose(some[0, 1], naive[0, 1], atol=1e-6)


def test_aie_is_zero_when_the_mean_is_the_heads_own_output(llama):
    """One prompt, patched with its own final-token z: every patch writes what is there."""
    prompts = make_prompts(llama, TASK, 1, 4, seed=0)
    groups = length_groups(llama, prompts)
    stats = head_stats(llama, groups)
    aie = average_indirect_effect(llama, stats.last_mean, groups)
    assert float(aie.abs().max()) < 1e-6


def test_head_stats_means_by_hand(llama):
    prompts = make_prompts(llama, TASK, 3, 4, seed=0)
    groups = length_groups(llama, prompts)
    stats = head_stats(llama, groups)
    _, cache = llama.run_with_cache(groups[0].tokens, names_filter=get_act_name("z", 1))
    z = cache[get_act_name("z", 1)].float()
    assert torch.allclose(stats.last_mean[1], z[:, -1].mean(0), atol=1e-6)
    assert torch.allclose(stats.all_mean[1], z.mean((0, 1)), atol=1e-6)
    assert stats.accuracy == float(stats.correct.float().mean())


def test_function_vector_is_the_sum_of_mean_head_results(llama):
    groups = length_groups(llama, make_prompts(llama, TASK, 3, 4, seed=0))
    stats = head_stats(llama, groups)
    heads = [(0, 1), (1, 3), (1, 0)]
    fv = function_vector(llama, stats.last_mean, heads)
    names = [get_act_name("result", l) for l in (0, 1)]
    _, cache = llama.run_with_cache(groups[0].tokens, names_filter=names)
    want = sum(cache[get_act_name("result", l)][:, -1, h].mean(0) for l, h in heads)
    assert torch.allclose(fv, want, atol=1e-5)
    assert top_heads(torch.tensor([[0.1, 0.5], [float("nan"), 0.3]]), 2) == [(0, 1), (1, 1)]


@pytest.mark.parametrize("layer", [0, 1])
def test_injection_changes_the_last_residual_by_exactly_the_vector(llama, layer):
    groups = length_groups(llama, make_prompts(llama, TASK, 2, 3, seed=0))
    tokens = groups[0].tokens
    v = torch.randn(llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
    names = [get_act_name("resid_pre", l) for l in range(llama.cfg.n_layers)]
    _, clean = llama.run_with_cache(tokens, names_filter=names)
    with llama.hooks(fwd_hooks=add_at_last_token(layer, v)):
        full, edited = llama.run_with_cache(tokens, names_filter=names)
    diff = edited[names[layer]] - clean[names[layer]]
    assert torch.allclose(diff[:, -1], v.expand_as(diff[:, -1]), atol=1e-6)
    assert float(diff[:, :-1].abs().max()) == 0.0  # other positions untouched
    for l in range(layer):
        assert torch.equal(edited[names[l]], clean[names[l]])  # earlier layers untouched
    # the resumed forward (from `layer`, final position only) gives the full forward's logits
    resumed = resume_last(llama, capture(llama, groups[0]), layer, 1, add_at_last_token(layer, v))
    assert torch.allclose(resumed[:, -1], full[:, -1], atol=1e-5)
    zero = fv_accuracy_by_layer(llama, groups, torch.zeros(llama.cfg.d_model), [layer])
    assert zero == fv_accuracy_by_layer(llama, groups, None, [layer]) == {layer: float(last_token_logits(llama, groups)[1].float().mean())}


def test_answer_id_is_the_first_token(llama):
    assert answer_id(llama, "w47 w9") == 47
    with pytest.raises(ValueError, match="nothing"):
        answer_id(llama, "")


@pytest.mark.bundled
def test_smollm_does_capitalize_ten_shot(smollm):
    task = load_tasks()["capitalize"]
    prompts = make_prompts(smollm, task, 2, 10, seed=1)
    assert prompts[0].answer_id == answer_id(smollm, prompts[0].answer)
    assert head_stats(smollm, length_groups(smollm, prompts)).accuracy == 1.0
