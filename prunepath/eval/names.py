"""Names of the evaluation suites and sparsity methods (no imports: the CLI reads them for --help)."""

SUITES = ("wikitext2", "lambada", "nlu", "xsum", "story_cloze", "alpaca_eval", "mt_bench")
GENERATION_SUITES = ("xsum", "alpaca_eval", "mt_bench")
METHODS = ("dense", "static", "topk", "threshold", "pp_global", "pp_layer")
# analysis-only methods (not in the default sweep): PrunePath with the oracle router (true expert
# shares computed from the FFN itself; as slow as dense) = the routing upper bound at a budget
EXTRA_METHODS = ("pp_oracle",)
ALL_METHODS = METHODS + EXTRA_METHODS
