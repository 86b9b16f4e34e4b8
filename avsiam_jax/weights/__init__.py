"""Pretrained weights: converters (vit_jax/big_vision .npz, timm, released AVSiam) and loading.

Entry points: `avsiam_jax.weights.load.init_params` (used by the trainer) and the CLI
`python -m avsiam_jax.weights.convert`. Importing this package needs no torch.
"""
