"""Reading finished or running runs: report, plots, parity, precision health. Light: no torch."""
