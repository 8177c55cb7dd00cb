"""The evaluation harness of the LM toolkit: registered tasks (`common.eval.tasks`) run on a dense LM from the
hub or a training run, with per-sample logs, means with standard errors, and resumable output.

    python -m common.evaluate --model=tiny-base --tasks=gsm8k,math500 --num_fewshot=4 --output=DIR

    from common.evaluate import LanguageModel, prepare, run
    from common.eval.tasks import get_tasks
    summary = run(LanguageModel(model, tokenizer), prepare(get_tasks("gsm8k"), num_fewshot=4), "out/")

The pure parts (registry, templates, few-shot sampling, filters, metrics) live on the eval floor in
`common.eval`; this package holds what touches a model, which is why it sits on the top floor.
"""
from __future__ import annotations

from common.evaluate.language_model import LanguageModel
from common.evaluate.runner import prepare, run
