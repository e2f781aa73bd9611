"""The scoring machinery the score stage drives: which rows each process scores (``schedule``),
what a row holds (``row_layout``), the part files (``parts``), the tangents and products program
per method (``tangents``) and train → test tracing (``queries``)."""
