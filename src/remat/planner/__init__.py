"""Plan: choose among the solver families and remade values, on a model profiled once."""
