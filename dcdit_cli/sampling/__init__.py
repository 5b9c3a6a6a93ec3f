"""Sampling: budgets, CFG and Lite-CFG, grids and ADM ``.npz`` files (``sampler.py``), and the
figures drawn along the sampling trajectory: router boundaries (``viz_boundaries.py``) and DyDiT
gates (``viz_gates.py``)."""
