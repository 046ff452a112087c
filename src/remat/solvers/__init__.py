"""Solvers: pure functions from small data structures (chains, graphs) to plans."""
