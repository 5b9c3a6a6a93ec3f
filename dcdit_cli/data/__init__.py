"""Data in: latent shards and the procedural shapes set (``datasets.py``), photographs
(``photos.py``), the VAE (``vae.py``), images → latent shards (``extract.py``), ADM's centre crop
(``imaging.py``) and ADM ``.npz`` / image-folder batches (``image_batches.py``)."""
