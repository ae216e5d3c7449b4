"""Figure scripts (plot_*.py), the miniature report and the scale checks;
the tables are `nanodo-sam tables`."""
