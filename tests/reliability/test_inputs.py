"""Bad input, as a user hits it: token tensors of the wrong rank, dtype or ids, empty prompts, masks
that do not fit, padded batches in every patching function, hooks returning the wrong dtype or
device, and generate's string in, string out.

Each case either gives a clear error (what was wrong, what to do) or the right answer; the
padded-batch answers are checked against running each prompt alone. Tiny random models from
conftest unless marked `bundled`.
"""

from __future__ import annotations

import pytest
import torch

from interp.cache import CacheStore
from interp.circuits import Faithfulness, edge_attribution, top_n
from interp.circuits.tasks.base import PromptPairs, check_task
from interp.circuits.tasks.induction import InductionPairs
from interp.metrics import LogitDiff
from interp.patching import activation_patch, attribution_patch
from interp.path_patching import path_patch

from conftest import VOCAB, make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


# ------------------------------------------------------------------------------------ token tensors
ENTRY_POINTS = {
    "forward": lambda m, x, **kw: m(x, **kw),
    "run_with_hooks": lambda m, x, **kw: m.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None)], **kw),
    "run_with_cache": lambda m, x, **kw: m.run_with_cache(x, names_filter="blocks.0.hook_resid_pre", **kw),
    "generate": lambda m, x, **kw: m.generate(x, max_new_tokens=2, **kw),
    "prepare_inputs": lambda m, x, **kw: m.prepare_inputs(x, **kw),
}

BAD_TOKENS = {
    # name: (input, error type, message pattern)
    "rank 3": (torch.tensor([[[5, 6, 7, 8, 9, 4]]]), ValueError, r"\[pos\] .* or \[batch, pos\], got a tensor of shape \(1, 1, 6\)"),
    "rank 0": (torch.tensor(5), ValueError, r"got a tensor of shape \(\)"),
    "float ids": (torch.tensor([[5.0, 6.0]]), TypeError, r"token ids must be integers .* got torch.float32"),
    "bool ids": (torch.tensor([[True, False]]), TypeError, r"token ids must be integers .* got torch.bool"),
    "id past the vocabulary": (torch.tensor([[5, 6, VOCAB + 3]]), ValueError,
                               rf"token id {VOCAB + 3} at \[0, 2\] is outside the model's vocabulary of {VOCAB} ids"),
    "negative id": (torch.tensor([[5, -1]]), ValueError, rf"token id -1 at \[0, 1\] is outside the model's vocabulary of {VOCAB}"),
    "no positions": (torch.zeros(1, 0, dtype=torch.long), ValueError, r"empty input: the token ids have shape \(1, 0\)"),
    "no prompts": (torch.zeros(0, 4, dtype=torch.long), ValueError, r"empty input: the token ids have shape \(0, 4\)"),
    "empty string": ("", ValueError, r"prompt 0 \(''\) tokenizes to no tokens"),
    "empty string in a list": (["w5 w6", ""], ValueError, r"prompt 1 \(''\) tokenizes to no tokens"),
    "empty list": ([], ValueError, r"no prompts: the list of strings is empty"),
    "list of ids": ([5, 6, 7], TypeError, r"a string, a list of strings or a tensor of token ids, got list of int"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_refused_naming_the_problem(model, entry, case):
    tokens, error, pattern = BAD_TOKENS[case]
    with pytest.raises(error, match=pattern):
        ENTRY_POINTS[entry](model, tokens)
    assert all(not p.active for p in model.hook_dict.values())


@pytest.mark.parametrize("case", ["rank 3", "id past the vocabulary", "empty string"])
def test_bad_tokens_are_refused_by_the_patching_sweeps(model, case):
    tokens, error, pattern = BAD_TOKENS[case]
    good = torch.tensor([[5, 6, 7, 8, 9, 4]])
    with pytest.raises(error, match=pattern):
        activation_patch(model, "resid_pre", tokens, good, answer_tokens=torch.tensor([[4, 5]]), progress=False)
    with pytest.raises(error, match=pattern):
        attribution_patch(model, "resid_pre", good, tokens, answer_tokens=torch.tensor([[4, 5]]), progress=False)


def test_a_rank_3_cache_request_writes_nothing(model, tmp_path):
    """The probe's CacheStore stored a residual stream off by 571 for [1, 1, 6] tokens."""
    store = CacheStore(tmp_path)
    with pytest.raises(ValueError, match=r"token ids must be \[pos\] \(one prompt\) or \[batch, pos\]"):
        store.get_or_compute(model, torch.tensor([[[5, 6, 7, 8, 9, 4]]]), ["blocks.0.hook_resid_pre"])
    assert list(tmp_path.glob("*.safetensors")) == []


def test_rank_1_and_narrow_integer_ids_run_as_one_prompt(model):
    ids = torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        ref = model(ids[None])
        torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
        torch.testing.assert_close(model(ids.to(torch.int16)), ref, atol=0, rtol=0)
    assert model.prepare_inputs(ids.to(torch.uint8))[0].dtype == torch.long


# ------------------------------------------------------------------------------------ attention masks
BAD_MASKS = {
    "shorter": (torch.ones(1, 4, dtype=torch.long), r"attention_mask has shape \(1, 4\) but the tokens have shape \(1, 6\)"),
    "longer": (torch.ones(1, 8, dtype=torch.long), r"attention_mask has shape \(1, 8\) but the tokens have shape \(1, 6\)"),
    "other batch": (torch.ones(2, 6, dtype=torch.long), r"attention_mask has shape \(2, 6\) but the tokens have shape \(1, 6\)"),
    "not 0/1": (torch.tensor([[1, 1, 2, 1, 1, 1]]), r"must hold 0 \(padding\) and 1 \(token\), found values \[1, 2\]"),
    "all padding": (torch.zeros(1, 6, dtype=torch.long), r"row 0 of attention_mask is all zeros"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_masks_that_do_not_fit_the_tokens_are_refused(model, entry, case):
    mask, pattern = BAD_MASKS[case]
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[entry](model, torch.tensor([[5, 6, 7, 8, 9, 4]]), attention_mask=mask)


def test_a_mask_with_strings_must_fit_their_tokens(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\) but the tokens have shape \(2, 3\)"):
        model(["w5 w6 w7", "w8 w9"], attention_mask=torch.ones(2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------ padded batches
# Two prompt pairs of unequal length (5 and 7 tokens), right-padded; each corrupted prompt differs
# from its clean one at position 2.
CLEAN = torch.tensor([[5, 6, 7, 8, 9, 1, 1], [4, 5, 6, 7, 8, 9, 5]])
CORRUPTED = torch.tensor([[5, 6, 4, 8, 9, 1, 1], [4, 5, 9, 7, 8, 9, 5]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
LENGTHS = [5, 7]
ANSWERS = torch.tensor([[40, 41], [42, 43]])
CLEAN_TEXT = ["w5 w6 w7 w8 w9", "w4 w5 w6 w7 w8 w9 w5"]
CORRUPTED_TEXT = ["w5 w6 w4 w8 w9", "w4 w5 w9 w7 w8 w9 w5"]


def alone(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt pair i without its padding, and its answers."""
    return CLEAN[i : i + 1, : LENGTHS[i]], CORRUPTED[i : i + 1, : LENGTHS[i]], ANSWERS[i : i + 1]


def padded_inputs(how: str) -> tuple:
    """(clean, corrupted, kwargs) as a user passes a padded batch: strings, or ids with their mask."""
    if how == "strings":
        return CLEAN_TEXT, CORRUPTED_TEXT, {}
    return CLEAN, CORRUPTED, {"attention_mask": MASK}


def pad_positions(values: torch.Tensor, n_pos: int, fill: float, dim: int = 1) -> torch.Tensor:
    """A per-prompt [layer, pos, ...] result widened to n_pos positions: past its end, patches change nothing."""
    shape = list(values.shape)
    shape[dim] = n_pos - shape[dim]
    return torch.cat([values, torch.full(shape, fill)], dim=dim)


def test_padding_helpers_describe_the_batch(model):
    tokens, mask = model.prepare_inputs(CLEAN_TEXT)
    assert torch.equal(tokens, CLEAN) and torch.equal(mask, MASK)


@pytest.mark.parametrize("how", ["strings", "ids and mask"])
@pytest.mark.parametrize("component,by", [("z", "head"), ("resid_pre", "pos"), ("z", "pos_head")])
def test_activation_patch_on_a_padded_batch_equals_each_prompt_alone(model, how, component, by):
    clean, corrupted, kw = padded_inputs(how)
    batch = activation_patch(model, component, clean, corrupted, answer_tokens=ANSWERS, by=by, progress=False, **kw)
    singles = [activation_patch(model, component, *alone(i)[:2], answer_tokens=alone(i)[2], by=by, progress=False)
               for i in range(2)]
    expected_clean = sum(s.clean_metric for s in singles) / 2
    assert batch.clean_metric == pytest.approx(expected_clean, abs=1e-5)
    assert batch.corrupted_metric == pytest.approx(sum(s.corrupted_metric for s in singles) / 2, abs=1e-5)
    widened = [s.values if by == "head" else pad_positions(s.values, CLEAN.shape[1], s.corrupted_metric) for s in singles]
    torch.testing.assert_close(batch.values, (widened[0] + widened[1]) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["strings", "ids and mask"])
def test_attribution_patch_on_a_padded_batch_equals_each_prompt_alone(model, how):
    clean, corrupted, kw = padded_inputs(how)
    batch = attribution_patch(model, ["z", "resid_pre"], clean, corrupted, answer_tokens=ANSWERS,
                              by={"z": "head", "resid_pre": "pos"}, progress=False, **kw)
    singles = [attribution_patch(model, ["z", "resid_pre"], *alone(i)[:2], answer_tokens=alone(i)[2],
                                 by={"z": "head", "resid_pre": "pos"}, progress=False) for i in range(2)]
    z = (singles[0]["z"].values + singles[1]["z"].values) / 2
    torch.testing.assert_close(batch["z"].values, z, atol=1e-5, rtol=0)
    # past prompt 0's end, its estimate is its run's metric (the gradient there is zero)
    widened = [pad_positions(singles[0]["resid_pre"].values, 7, singles[0]["resid_pre"].corrupted_metric),
               singles[1]["resid_pre"].values]
    torch.testing.assert_close(batch["resid_pre"].values, (widened[0] + widened[1]) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["strings", "ids and mask"])
@pytest.mark.parametrize("receivers", [None, [(1, 0), (1, 3)]])
def test_path_patch_on_a_padded_batch_equals_each_prompt_alone(model, how, receivers):
    clean, corrupted, kw = padded_inputs(how)
    batch = path_patch(model, clean, corrupted, answer_tokens=ANSWERS, receivers=receivers, progress=False, **kw)
    singles = [path_patch(model, *alone(i)[:2], answer_tokens=alone(i)[2], receivers=receivers, progress=False)
               for i in range(2)]
    torch.testing.assert_close(batch.values, (singles[0].values + singles[1].values) / 2, atol=1e-5, rtol=0, equal_nan=True)


def padded_task() -> PromptPairs:
    return PromptPairs(CLEAN, CORRUPTED, ANSWERS, attention_mask=MASK)


def single_tasks() -> list[PromptPairs]:
    return [PromptPairs(*alone(i)) for i in range(2)]


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_edge_attribution_on_a_padded_task_equals_each_prompt_alone(model, method):
    batch = edge_attribution(model, padded_task(), method=method, steps=3, progress=False)
    singles = [edge_attribution(model, t, method=method, steps=3, progress=False) for t in single_tasks()]
    torch.testing.assert_close(batch.scores, (singles[0].scores + singles[1].scores) / 2, atol=1e-5, rtol=0)
    assert batch.clean_metric == pytest.approx(sum(s.clean_metric for s in singles) / 2, abs=1e-5)
    assert batch.corrupted_metric == pytest.approx(sum(s.corrupted_metric for s in singles) / 2, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_faithfulness_on_a_padded_task_equals_each_prompt_alone(model, batch_size):
    task = padded_task()
    faith = Faithfulness(model, task, batch_size=batch_size)
    singles = [Faithfulness(model, t) for t in single_tasks()]
    assert faith.clean_metric == pytest.approx(sum(s.clean_metric for s in singles) / 2, abs=1e-5)
    circuit = top_n(edge_attribution(model, task, progress=False), 15)
    corrupt = faith.graph.mask & ~circuit.edge_mask(faith.graph)
    assert faith.metric_of(corrupt) == pytest.approx(sum(s.metric_of(corrupt) for s in singles) / 2, abs=1e-5)
    curve = faith.curve(edge_attribution(model, task, progress=False), [5, 15], progress=False)
    assert curve.faithfulness.notna().all()


def test_task_metric_and_check_read_each_prompt_at_its_last_real_token(model):
    task = padded_task()
    with torch.no_grad():
        full = model(CLEAN)
        own = [float(t.metric(model(t.clean_tokens))) for t in single_tasks()]
    torch.testing.assert_close(task.logit_diff(full), torch.tensor(own), atol=1e-5, rtol=0)
    assert check_task(model, task)["clean_logit_diff"] == pytest.approx(sum(own) / 2, abs=1e-5)
    assert task[1:].padded is False and task[:1].padded is True  # slicing keeps the mask


LEFT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
REFUSE_LEFT = r"attention_mask row 0 is \[0, 0, 1, 1, 1, 1, 1\]: only right padding .* group the prompts by token length"
SWEEPS = {
    "activation_patch": lambda m, c, k, **kw: activation_patch(m, "z", c, k, by="head", progress=False, **kw),
    "attribution_patch": lambda m, c, k, **kw: attribution_patch(m, "z", c, k, by="head", progress=False, **kw),
    "path_patch": lambda m, c, k, **kw: path_patch(m, c, k, progress=False, **kw),
}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_left_padding_is_refused_with_how_to_batch(model, sweep):
    with pytest.raises(ValueError, match=REFUSE_LEFT):
        SWEEPS[sweep](model, CLEAN, CORRUPTED, answer_tokens=ANSWERS, attention_mask=LEFT_MASK)


def test_left_padding_is_refused_by_tasks():
    with pytest.raises(ValueError, match=REFUSE_LEFT):
        PromptPairs(CLEAN, CORRUPTED, ANSWERS, attention_mask=LEFT_MASK)


def final_position_sum(logits: torch.Tensor) -> torch.Tensor:
    """A caller's metric that does not say which positions it reads."""
    return logits[:, -1, 40].sum()


REFUSE_METRIC = r"the batch is padded .* 'final_position_sum' .*`last_position_only = True`.* group the prompts by token length"


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_a_metric_that_may_read_padding_is_refused(model, sweep):
    with pytest.raises(ValueError, match=REFUSE_METRIC):
        SWEEPS[sweep](model, CLEAN, CORRUPTED, metric=final_position_sum, attention_mask=MASK)


@pytest.mark.parametrize("run", ["edge_attribution", "Faithfulness"])
def test_a_caller_metric_on_a_padded_task_must_read_the_final_position_only(model, run):
    call = {"edge_attribution": lambda metric: edge_attribution(model, padded_task(), metric=metric, progress=False),
            "Faithfulness": lambda metric: Faithfulness(model, padded_task(), metric=metric)}[run]
    with pytest.raises(ValueError, match=REFUSE_METRIC):
        call(final_position_sum)
    # one that says so is handed each prompt's logits at its last real token
    metric = LogitDiff(ANSWERS)
    result = call(metric)
    assert result.clean_metric == pytest.approx(float(padded_task().metric(model(CLEAN))), abs=1e-5)


def test_a_task_reading_every_position_cannot_be_padded():
    with pytest.raises(ValueError, match="InductionPairs's metric reads more than the final position"):
        InductionPairs(CLEAN, CORRUPTED, ANSWERS, attention_mask=MASK, length=2, prefix=1)


def test_pairs_of_unequal_length_are_refused(model):
    """Padding hides a pair whose clean and corrupted prompts differ in length: both pad to one width."""
    with pytest.raises(ValueError, match="clean prompt 0 has 5 tokens but corrupted prompt 0 has 6"):
        activation_patch(model, "z", CLEAN_TEXT, ["w5 w6 w4 w8 w9 w9", CORRUPTED_TEXT[1]], answer_tokens=ANSWERS,
                         by="head", progress=False)


@pytest.mark.bundled
def test_padded_ioi_batch_reads_each_prompt_at_its_last_token_on_smollm(smollm):
    """The probe's case: a padded batch reported a clean logit difference of -1.56 for 2.39 per prompt."""
    clean = ["When Mary and John went to the store, John gave a drink to",
             "When Mary and John went to the big old store downtown, John gave a drink to"]
    corrupted = [c.replace(", John", ", Alice") for c in clean]
    tok = smollm.tokenizer
    answers = torch.tensor([[tok.encode(" Mary")[0], tok.encode(" John")[0]]] * 2)
    batch = attribution_patch(smollm, "z", clean, corrupted, answer_tokens=answers, by="head", progress=False)
    with torch.no_grad():
        alone_diffs = [float(LogitDiff(answers[:1])(smollm(c))) for c in clean]
    assert smollm.prepare_inputs(clean)[1] is not None  # the batch really is padded
    assert batch.clean_metric == pytest.approx(sum(alone_diffs) / 2, abs=1e-3)


# ------------------------------------------------------------------------------------ hook returns
def as_float64(x, hook):
    return x.double()


def on_meta(x, hook):
    return x.to("meta")


HOOK_POINTS = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.attn.hook_q",
               "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.attn.hook_result", "blocks.1.mlp.hook_post"]
WRONG_RETURNS = {
    "float64": (as_float64, r"hook function 'as_float64' on {name} returned a torch.float64 tensor; it must return the "
                            r"activation's dtype torch.float32"),
    "meta device": (on_meta, r"hook function 'on_meta' on {name} returned a tensor on device meta; it must stay on the "
                             r"activation's device cpu"),
}


@pytest.mark.parametrize("name", HOOK_POINTS)
@pytest.mark.parametrize("case", list(WRONG_RETURNS))
def test_hook_returning_the_wrong_dtype_or_device_is_named(model, name, case):
    fn, pattern = WRONG_RETURNS[case]
    with pytest.raises(ValueError, match=pattern.format(name=name.replace(".", r"\."))):
        model.run_with_hooks(torch.tensor([[5, 6, 7, 8]]), fwd_hooks=[(name, fn)])
    assert all(not p.active for p in model.hook_dict.values())
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[5, 6, 7, 8]])), model.hf_model(torch.tensor([[5, 6, 7, 8]])).logits)


# ------------------------------------------------------------------------------------ generate
def test_generate_string_in_string_out(model):
    out = model.generate("w5 w6 w7", max_new_tokens=3)
    tokens = model.generate(model.to_tokens("w5 w6 w7"), max_new_tokens=3)
    assert isinstance(out, str) and out.startswith("w5 w6 w7")
    assert out == model.tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (1, 6)
    assert torch.equal(model.generate("w5 w6 w7", max_new_tokens=3, return_type="tokens"), tokens)
    assert model.generate(tokens[:, :3], max_new_tokens=3, return_type="str") == [out]


def test_generate_list_in_list_out_equals_each_prompt_alone(model):
    prompts = ["w5 w6", "w7 w8 w9 w4 w5"]
    out = model.generate(prompts, max_new_tokens=4)
    assert out == [model.generate(p, max_new_tokens=4) for p in prompts]


def test_generate_rejects_an_unknown_return_type(model):
    with pytest.raises(ValueError, match="return_type must be 'input', 'str' or 'tokens', got 'text'"):
        model.generate("w5", max_new_tokens=1, return_type="text")


@pytest.mark.bundled
def test_generate_string_on_smollm(smollm):
    prompt = "The capital of France is"
    out = smollm.generate(prompt, max_new_tokens=3)
    assert isinstance(out, str) and out.startswith(prompt) and "Paris" in out[len(prompt):]


@pytest.mark.bundled
def test_out_of_vocabulary_ids_name_smollm_vocabulary(smollm):
    with pytest.raises(ValueError, match=r"token id 49152 at \[0, 1\] is outside the model's vocabulary of 49152 ids"):
        smollm(torch.tensor([[504, 49152]]))
