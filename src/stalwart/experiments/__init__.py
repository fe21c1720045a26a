"""Experiments: grids of real jobs, aggregated over seeds into plots and tables.

``common`` holds what every experiment shares (running a grid of jobs, accuracy bands
over seeds, markdown tables); each experiment module defines its grid and its table.
"""
