"""Suite orchestration for `wmfast bench`: the attention-memory suite, reports, summaries and plots."""
