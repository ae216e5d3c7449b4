"""Result scripts: make_tables.py (Tables 1-6) and plot_*.py (Figures 1-5)."""
