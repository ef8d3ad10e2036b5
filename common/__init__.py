"""The bottom layer every package imports: errors, metrics, reports, plots and CLI helpers shared by all."""
