"""Research solvers that no user path runs yet: the op-level model and its simulator
(:mod:`lab.opgraph`), the value-level dynamic program (:mod:`lab.values`), local search
over value schedules (:mod:`lab.polish`) and the exact integer program (:mod:`lab.ilp`).

``make bench-gap`` measures remat's chain solvers and these against the integer program.
They import the chain model (:mod:`remat.chain`) and nothing else of remat's runtime.
"""
