"""The diffusion process: ADM's Gaussian diffusion with DiT's settings, its losses and its sampler
(``gaussian.py``)."""
