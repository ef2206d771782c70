"""Evaluation of PrunePath models: perplexity, zero-shot NLU (lm-evaluation-harness), NLG,
instruction-following fidelity, and the matched-sparsity sweep against baselines.

>>> from prunepath.eval import suites
>>> suites.wikitext2(model, tok, limit=16)["ppl"]
>>> from prunepath.eval.sweep import SweepConfig, run_sweep

Modules: ``data`` (local files, sha256), ``metrics`` (ppl, accuracy, ROUGE), ``scoring``
(log-likelihoods), ``generation`` (greedy chat generation), ``nlu`` (lm-eval adapter and
``tasks/``), ``suites`` (one function per suite), ``methods`` (baselines and matching),
``sweep`` (the run), ``report`` (tables, plots, target check), ``quickstart``.
Importing this package loads nothing heavy.
"""

from .names import GENERATION_SUITES, METHODS, SUITES

__all__ = ["SUITES", "GENERATION_SUITES", "METHODS"]
