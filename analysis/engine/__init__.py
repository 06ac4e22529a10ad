"""The analysis engine: the subject and its passes, the options, the recorder of tidy rows,
progress, the analysis folder and its summary."""
