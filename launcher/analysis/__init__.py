"""Judging runs after the fact: the report's summary, plots and figures, parity and its comparison,
precision health. Light: no torch."""
