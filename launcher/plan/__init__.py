"""Recipe + hardware -> the frozen Plan every other part reads: the model resolved once (model.py),
batch, precision, backend config, data checks, vocabulary, resume rules. Light: no torch."""
