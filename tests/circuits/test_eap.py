"""EAP / EAP-IG edge scores (circuits/eap.py) against exact edge patching on tiny Llama-family models."""

import pytest
import torch

from interp.circuits import EdgeScores, Graph, edge_attribution, node_outputs, patched_logits, receiver_gradients

from conftest import make_tiny, random_prompt_pairs


def _all_single_edges(m, g, task, outputs):
    r_idx, u_idx = g.mask.nonzero(as_tuple=True)
    base = float(task.metric(m(task.clean_tokens)))
    out = []
    for r, u in zip(r_idx.tolist(), u_idx.tolist()):
        c = torch.zeros_like(g.mask)
        c[r, u] = True
        out.append(float(task.metric(patched_logits(m, g, task.clean_tokens, outputs, c))) - base)
    return torch.tensor(out, dtype=torch.float64), r_idx, u_idx


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eap_is_the_derivative_of_exact_edge_patching(family):
    """With corrupted outputs moved only eps towards their value, exact single-edge patching is linear:
    (metric(patched) - metric(clean)) / eps must equal the EAP score of that edge, for every edge."""
    m = make_tiny(family)
    m.hf_model.double()  # the RMSNorm still runs in float32 inside HF: eps 1e-3, tolerance 5e-3
    g, task = Graph.from_model(m), random_prompt_pairs()
    scores = edge_attribution(m, task)
    eps = 1e-3
    clean_out = node_outputs(m, task.clean_tokens, g)
    near = clean_out + eps * (node_outputs(m, task.corrupted_tokens, g) - clean_out)
    exact, r, u = _all_single_edges(m, g, task, near)
    est = scores.scores[r, u].double()
    assert est.abs().max() > 0.3  # non-trivial scores
    torch.testing.assert_close(exact / eps, est, atol=5e-3, rtol=0)


def test_eap_and_ig_track_exact_edge_patching():
    """Full corruptions: the first-order scores correlate with one-forward-per-edge exact patching."""
    m = make_tiny("llama")
    g, task = Graph.from_model(m), random_prompt_pairs()
    exact, r, u = _all_single_edges(m, g, task, node_outputs(m, task.corrupted_tokens, g))
    eap = edge_attribution(m, task).scores[r, u].double()
    ig = edge_attribution(m, task, method="eap-ig", steps=16).scores[r, u].double()
    assert torch.corrcoef(torch.stack([exact, eap]))[0, 1] > 0.8
    assert torch.corrcoef(torch.stack([exact, ig]))[0, 1] > 0.6


def test_receiver_gradients_sum_to_the_shared_gradient():
    """The q/k/v receivers of a layer split the gradient at its ln1 input: mapped back, they sum to the
    gradient the residual stream gets through ln1 (checked against autograd on resid_pre via ln1.hook_normalized)."""
    m = make_tiny("llama")
    g, task = Graph.from_model(m), random_prompt_pairs()
    grads, _ = receiver_gradients(m, g, task.clean_tokens, task.metric)
    seen = {}
    _, cache = m.run_with_cache(task.clean_tokens, names_filter=["blocks.1.hook_resid_pre"])

    def grab(x, hook):
        seen["g"] = None

    store = {}
    with torch.enable_grad():
        logits = m.run_with_hooks(task.clean_tokens, fwd_hooks=[("hook_embed", lambda x, hook: x.detach().requires_grad_(True))],
                                  bwd_hooks=[("blocks.1.ln1.hook_normalized", lambda gr, hook: store.__setitem__("g", gr))])
        task.metric(logits).backward()
    x = cache["blocks.1.hook_resid_pre"].clone().requires_grad_(True)
    ln1 = m.adapter.layers[1].ln1
    (want,) = torch.autograd.grad(ln1.forward(x), x, store["g"])
    rec = [i for i, r in enumerate(g.receivers) if r.layer == 1 and r.kind in "qkv"]
    torch.testing.assert_close(grads[rec].sum(0), want.float(), atol=1e-5, rtol=1e-4)


def test_ig_with_one_step_is_the_gradient_at_the_midpoint():
    m = make_tiny("llama")
    g, task = Graph.from_model(m), random_prompt_pairs()
    ig = edge_attribution(m, task, method="eap-ig", steps=1)
    cl, co = node_outputs(m, task.clean_tokens, g), node_outputs(m, task.corrupted_tokens, g)
    grads, _ = receiver_gradients(m, g, task.clean_tokens, task.metric, embed=(cl[0] + co[0]) / 2)
    want = (grads.flatten(1) @ (co - cl).flatten(1).T) * g.mask
    torch.testing.assert_close(ig.scores, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        edge_attribution(m, task, method="acdc")


def test_edge_scores_frame_lists_the_largest_scores_first():
    g = Graph(1, 2, 1)
    s = torch.zeros(g.mask.shape)
    s[g.parse_edge("a0.h1->logits")] = -3.0
    s[g.parse_edge("input->m0")] = 2.0
    frame = EdgeScores(g, s, "eap", 1.0, 0.0).frame()
    assert frame.edge.tolist()[:2] == ["a0.h1->logits", "input->m0"]
    assert frame.score.tolist()[:2] == [-3.0, 2.0] and frame.abs_score.tolist()[2:] == [0.0] * (g.n_edges - 2)
