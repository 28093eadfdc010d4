"""The shipped question set (data/mcq_questions.json), prompts and permutations (interp.mcq.questions)."""

from __future__ import annotations

import pytest

from interp.circuits.tasks.multiple_choice import QUESTIONS
from interp.mcq import PromptFormat, Question, build_prompts, letter_ids, letter_logits, load_questions, parse_questions


def test_shipped_questions():
    qs = load_questions()
    assert len(qs) >= 100
    assert {q.topic for q in qs} == {"knowledge", "arithmetic", "meaning"}
    for q in qs:
        assert len(q.options) == 4 and len(set(q.options)) == 4 and 0 <= q.answer < 4
    assert len({q.question for q in qs}) == len(qs)
    # the right answers are spread evenly over the stored positions
    counts = [sum(q.answer == i for q in qs) for i in range(4)]
    assert max(counts) - min(counts) <= 1
    # today's 12 easy questions come first, with the same right answers
    for q, (text, right, wrong) in zip(qs, QUESTIONS):
        assert q.question == text and q.options[q.answer] == right and set(q.options) == {right, *wrong}
    assert len(load_questions(topics=["arithmetic"])) == 40
    with pytest.raises(ValueError, match="unknown topics"):
        load_questions(topics=["history"])


def test_cyclic_shifts_and_prompt():
    q = Question("What is 2 plus 2?", ("3", "4", "5", "6"), 1)
    assert q.shifted(0) == (("3", "4", "5", "6"), 1)
    assert q.shifted(1) == (("4", "5", "6", "3"), 0)
    assert q.shifted(3) == (("6", "3", "4", "5"), 2)
    ps = build_prompts([q])
    assert len(ps) == 4 and ps.shift == [0, 1, 2, 3] and ps.gold == [1, 0, 3, 2]
    assert ps.prompts[1] == "Question: What is 2 plus 2?\nA. 4\nB. 5\nC. 6\nD. 3\nAnswer:"
    # every option sits once at every letter
    shown = [p.split("\n")[1:5] for p in ps.prompts]
    for letter in range(4):
        assert sorted(s[letter][3:] for s in shown) == sorted(q.options)


def test_bad_questions_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        Question("q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="repeat"):
        Question("q", ("a", "a", "b", "c"), 0)
    with pytest.raises(ValueError, match="lacks"):
        parse_questions([{"question": "q", "options": ["a", "b"]}])
    with pytest.raises(ValueError, match="do not have 4 options"):
        build_prompts([Question("q", ("a", "b", "c"), 0)])
    with pytest.raises(ValueError, match="letters"):
        PromptFormat().render("q", ["a", "b"])


@pytest.mark.bundled
def test_letters_are_single_tokens_for_both_bundled_tokenizers(smollm):
    import interp

    assert letter_ids(smollm.tokenizer) == [330, 389, 340, 422]
    qwen = interp.load("qwen2.5-coder-0.5b")
    assert letter_ids(qwen.tokenizer) == [362, 425, 356, 422]
    # the letter after "Answer:" is the same token as " A" on its own, for every shipped prompt format line
    for model in (smollm, qwen):
        ids = model.tokenizer.encode("Answer: B", add_special_tokens=False)
        assert ids[-1] == letter_ids(model.tokenizer)[1]


@pytest.mark.bundled
def test_letter_logits_match_the_model_smollm(smollm):
    ps = build_prompts(load_questions()[:1])
    ids = letter_ids(smollm.tokenizer)
    lg = letter_logits(smollm, ps, ids, batch_size=2)
    for i in (0, 3):
        full = smollm(ps.prompts[i])[0, -1, ids].float()
        assert lg[i].tolist() == pytest.approx(full.tolist(), abs=1e-3)
