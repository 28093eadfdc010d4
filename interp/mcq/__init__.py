"""Position bias in multiple-choice answers: a harness, PriDe debiasing, and its mechanism.

    questions.py   Question, PromptFormat, load_questions (data/mcq_questions.json), build_prompts
                   (every cyclic permutation of the options), letter_ids
    run.py         letter_logits: the answer letters' logits at the last token, batches of equal length
    bias.py        LetterTable, selection rates, recalls, RStd, accuracy, permutation consistency,
                   PriDe (Zheng et al. 2024, "Large Language Models Are Not Robust Multiple Choice
                   Selectors", arXiv:2309.03882)
    mechanism.py   logit lens and direct logit attribution on the letter tokens, mean ablation of the
                   heads and MLPs that push the favoured letter (Li & Gao 2024, "Anchored Answers",
                   arXiv:2405.03205)

    from interp.mcq import load_questions, build_prompts, letter_ids, letter_logits, LetterTable, summarize, pride
    ps = build_prompts(load_questions())
    table = LetterTable.from_prompts(ps, letter_logits(model, ps, letter_ids(model.tokenizer)))
    summarize(table).rstd, pride(table, share=0.05).after.rstd

See docs/position-bias.md.
"""

from __future__ import annotations

from .bias import (
    BiasSummary,
    LetterTable,
    PrideResult,
    consistency,
    debias,
    estimate_prior,
    estimation_split,
    pride,
    question_priors,
    recalls,
    rstd,
    selection_rates,
    summarize,
)
from .mechanism import LastActs, bias_scores, collect_last, letter_dla, letter_lens, mean_ablation_hooks, top_components
from .questions import PromptFormat, PromptSet, Question, build_prompts, letter_ids, load_questions, parse_questions
from .run import length_batches, letter_logits, tokenize

__all__ = [
    "Question", "PromptFormat", "PromptSet", "load_questions", "parse_questions", "build_prompts", "letter_ids",
    "letter_logits", "length_batches", "tokenize",
    "LetterTable", "BiasSummary", "PrideResult", "selection_rates", "recalls", "rstd", "consistency", "summarize",
    "question_priors", "estimate_prior", "debias", "estimation_split", "pride",
    "LastActs", "collect_last", "letter_lens", "letter_dla", "bias_scores", "top_components", "mean_ablation_hooks",
]
