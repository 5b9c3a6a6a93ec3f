"""`dcdit export`: diffusers folders, model cards and the Hugging Face Hub (docs/diffusers.md)."""
