"""posleak analysis: the measurements of ../shared/science.md, per run and across variants."""
