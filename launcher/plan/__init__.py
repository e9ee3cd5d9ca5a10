"""Recipe + hardware -> the frozen Plan every other part reads: batch, precision, backend config, data checks, vocabulary, resume rules. Light: no torch."""
