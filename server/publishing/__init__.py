"""Publishing a run: merge, evaluate, model card, manifest and signature. No Flower."""
