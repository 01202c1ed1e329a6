"""Datasets: the mini set built from installed wheels, rendered text, verified downloads."""
