"""Training: the shared loop (``loop.py``), the loss objects (``losses.py``), upcycling a DiT
(``upcycle.py``) and its distillation warm-up (``distill.py``), dcdit's own checkpoints
(``checkpoint.py``) and the released DiT / DC-DiT checkpoints it reads (``released_checkpoints.py``)."""
