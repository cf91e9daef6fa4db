"""A whole recovery site in one Trio process, from a seed: the production server and
primaries over an in-memory network, on a simulated clock, with faults and invariants
(``docs/simulation.md``, ``scripts/simulate``)."""
