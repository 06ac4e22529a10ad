"""Reports: the comparison across variants, the studies, their figures and HTML."""
