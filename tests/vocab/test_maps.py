"""MAPS head profiling: the OV map against float64 weight arithmetic, a scripted copying head,
streamed QK top-k against the whole matrix, and the dynamic score and ablation on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import interp
from interp.vocab import maps

from conftest import make_tiny, word_tokenizer


def brute_ov_separate(model: interp.HookedModel, layer: int, head: int, sources: torch.Tensor) -> torch.Tensor:
    """M_OV rows in float64 straight from the HF weights of a Llama-like model (separate q/k/v)."""
    hf, c = model.hf_model, model.cfg
    base = hf.model
    d = lambda t: t.detach().double()
    def rms(x, norm):
        return x / x.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt() * d(norm.weight)
    e = d(base.embed_tokens.weight)[sources]
    if layer > 0:
        blk0 = base.layers[0]
        x = rms(e, blk0.post_attention_layernorm)
        mlp = blk0.mlp
        e = (torch.nn.functional.silu(x @ d(mlp.gate_proj.weight).T) * (x @ d(mlp.up_proj.weight).T)) @ d(mlp.down_proj.weight).T
    attn = base.layers[layer].self_attn
    x = rms(e, base.layers[layer].input_layernorm)
    kv = head // c.n_groups
    v = x @ d(attn.v_proj.weight)[kv * c.d_head:(kv + 1) * c.d_head].T
    out = v @ d(attn.o_proj.weight)[:, head * c.d_head:(head + 1) * c.d_head].T
    return (out * d(base.norm.weight)) @ d(hf.lm_head.weight).T


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_ov_map_equals_float64_weight_arithmetic(family, layer):
    model = make_tiny(family)
    sources = torch.tensor([3, 17, 42, 99])
    for head in range(model.cfg.n_heads):  # GQA: 4 query heads over 2 value heads
        got = maps.ov_logits(model, layer, head, sources).double()
        torch.testing.assert_close(got, brute_ov_separate(model, layer, head, sources), atol=1e-4, rtol=1e-4)


def test_ov_map_runs_on_every_family(family):
    model = make_tiny(family)
    rows = maps.ov_logits(model, 1, 0, torch.tensor([5, 6]))
    assert rows.shape == (2, model.cfg.d_vocab) and torch.isfinite(rows).all()


def copying_head_model(sign: float) -> interp.HookedModel:
    """One head (d_head = d_model = 32) whose OV circuit is sign * identity, unit-norm embeddings
    shared with the unembedding, unit norms: M_OV[s] = sign * c_s * E E^T[s], whose top entry is
    s itself for sign +1 (e_s . e_t < 1 = e_s . e_s) and whose bottom entry is s for sign -1."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(torch.randn(100, 32), dim=-1)
        hf.model.embed_tokens.weight.copy_(e)
        hf.lm_head.weight.copy_(e)
        attn = hf.model.layers[0].self_attn
        attn.v_proj.weight.copy_(torch.eye(32))
        attn.o_proj.weight.copy_(sign * torch.eye(32))
    return interp.HookedModel(hf, word_tokenizer())


def scripted_relation(model: interp.HookedModel, k: int = 1) -> maps.Relation:
    ids = torch.arange(4, 100)
    words = tuple((f"w{i}", f"w{i}") for i in ids.tolist())
    return maps.Relation("copying", k, "<X>", words, ids, ids.clone(), 0)


def test_a_scripted_copying_head_scores_one_and_its_negation_suppresses():
    copier = copying_head_model(+1.0)
    scores = maps.relation_scores(copier, scripted_relation(copier), block_size=7)  # several blocks
    at = scores.set_index(["layer", "head"])
    assert at.loc[(0, 0), "score"] == 1.0 and at.loc[(0, 0), "suppression"] == 0.0
    suppressor = copying_head_model(-1.0)
    at = maps.relation_scores(suppressor, scripted_relation(suppressor)).set_index(["layer", "head"])
    assert at.loc[(0, 0), "score"] == 0.0 and at.loc[(0, 0), "suppression"] == 1.0


def test_top_mappings_of_the_copying_head_are_the_tokens_themselves():
    copier = copying_head_model(+1.0)
    table = maps.ov_top_mappings(copier, 0, 0, k=3, block_size=16)
    assert len(table) == 100 * 3
    top = table[table["rank"] == 0]
    assert (top["source_id"] == top["target_id"]).all()


def test_streamed_qk_top_keys_equal_the_whole_matrix():
    model = make_tiny("qwen2")
    queries = torch.tensor([4, 9, 50])
    for layer in (0, 1):
        scores, ids = maps.qk_top_keys(model, layer, 3, queries, k=5, block_size=7)
        whole_scores, whole_ids = maps.qk_top_keys(model, layer, 3, queries, k=5, block_size=1000)
        torch.testing.assert_close(scores, whole_scores)
        assert torch.equal(ids, whole_ids)
        # independent: q . k over the whole vocabulary from the HF weights (layer 0: raw embeddings)
        if layer == 0:
            base = model.hf_model.model
            x = base.layers[0].input_layernorm(base.embed_tokens.weight)
            attn = base.layers[0].self_attn
            q = (x[queries] @ attn.q_proj.weight.T).view(3, 4, 8)[:, 3]
            k = (x @ attn.k_proj.weight.T).view(100, 2, 8)[:, 3 // 2]
            expected = (q @ k.T).topk(5, dim=-1)
            torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=1e-5)


def test_bundled_relations_keep_only_single_token_pairs(smollm):
    relations = maps.load_relations(smollm)
    assert {"copying", "name_copying", "country_to_capital", "antonym", "singular_to_plural", "verb_past_tense"} <= set(relations)
    tok = smollm.tokenizer
    for r in relations.values():
        assert len(r.words) == len(r.sources) >= 10 and r.k == (1 if "copying" in r.name else 10)
        for (s, t), sid, tid in zip(r.words, r.sources.tolist(), r.targets.tolist()):
            assert tok.encode(" " + s, add_special_tokens=False) == [sid] and tok.encode(" " + t, add_special_tokens=False) == [tid]
    with pytest.raises(KeyError, match="the bundled ones are"):
        maps.load_relations(smollm, ["capital_of_mars"])


def test_dynamic_scores_and_ablation_on_smollm2(smollm):
    relation = maps.load_relations(smollm, ["country_to_capital"])["country_to_capital"]
    small = maps.Relation(relation.name, relation.k, relation.template, relation.words[:6], relation.sources[:6],
                          relation.targets[:6], relation.dropped)
    dynamic = maps.dynamic_relation_scores(smollm, small, batch_size=4).set_index(["layer", "head"])
    # independent: hook_result (the head's own output) at the last position, through the final norm weight and W_U
    tokens = torch.tensor([smollm.tokenizer.encode(p) for p in small.prompts()])
    layer = 20
    with torch.no_grad():
        _, cache = smollm.run_with_cache(tokens, names_filter=[f"blocks.{layer}.attn.hook_result"])
        result = cache[f"blocks.{layer}.attn.hook_result"][:, -1]  # [batch, head, d_model]
        logits = (result * smollm.hf_model.model.norm.weight) @ smollm.hf_model.lm_head.weight.T
    for head in range(smollm.cfg.n_heads):
        top = logits[:, head].topk(10, dim=-1).indices
        expected = (top == small.targets[:, None]).any(-1).float().mean().item()
        assert dynamic.loc[(layer, head), "dynamic"] == pytest.approx(expected)
    # accuracy with no ablation is the greedy accuracy; zeroing heads at the last position changes the logits as a hook would
    with torch.no_grad():
        greedy = smollm(tokens)[:, -1].argmax(-1)
    assert maps.relation_accuracy(smollm, small) == pytest.approx((greedy == small.targets).float().mean().item())
    every = [(l, h) for l in range(smollm.cfg.n_layers) for h in range(smollm.cfg.n_heads)]
    assert maps.relation_accuracy(smollm, small, every) <= 1.0
    static = maps.relation_scores(smollm, small)
    check = maps.ablation_accuracy(smollm, small, static, n_heads=5, n_random=1)
    assert check.loc[0, "clean"] == pytest.approx((greedy == small.targets).float().mean().item())
