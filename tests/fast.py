"""Fast editor settings for tests: few optimisation steps and short context templates. The tests are about
bookkeeping, algebra and equalities, not about edit quality; `dict(FAST, key=value)` adds a setting."""

# ROME, C-ROME, MEMIT, AlphaEdit: two v* steps, five context templates of four tokens.
FAST = dict(v_num_grad_steps=2, context_template_length_params=((4, 5),))
# The MEMIT and AlphaEdit unit tests: three v* steps.
FAST_MEMIT = dict(FAST, v_num_grad_steps=3)
# The ROME unit tests: four v* steps with weight decay, the preset's context templates.
FAST_ROME = dict(v_num_grad_steps=4, v_weight_decay=1e-3)
# FT-L∞: two fine-tuning steps.
FAST_FT = dict(num_steps=2)
# By registry name, for tests that go over every editor (MEND has no steps to cut).
FAST_BY_EDITOR = {"rome": FAST, "c-rome": FAST, "c-rome-prefix": FAST, "rome-2k": FAST, "memit": FAST, "alphaedit": FAST,
                  "memit-2k": FAST, "alphaedit-2k": FAST,
                  "ft-linf": FAST_FT, "mend": {}}
