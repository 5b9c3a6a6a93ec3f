"""Evaluation: the ADM-exact metrics (``fid.py``, ``precision_recall.py``), `dcdit eval` from a
checkpoint to paper Table 1 (``evaluate.py``) and its figures (``figures.py``)."""
