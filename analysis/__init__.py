"""posleak analysis: the measurements of docs/science.md, per run and across variants."""
