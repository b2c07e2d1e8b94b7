"""Models and what is read from them: loading, tokens, hooks, live edits, key statistics C, keys k."""
