"""scoresde: score-based generative modelling, small and literal.

Modules are named after the math and are imported on demand (``from scoresde import sde``):

- ``sde``        VE / VP / sub-VP SDEs (Song et al., 2021, Sec. 3.4 and App. B)
- ``noise``      geometric noise levels and sigma_1 from data (Song & Ermon, 2019; 2020)
- ``toy``        Gaussian mixtures with exact scores and exact SDE marginals
- ``losses``     exact / sliced / denoising score matching, continuous-time DSM, DDPM eps-loss
- ``sampling``   Langevin, annealed Langevin, predictor-corrector, probability-flow ODE, EDM Heun
- ``likelihood`` exact log-likelihood through the probability-flow ODE, bits/dim
- ``metrics``    mode weights, sliced Wasserstein, Frechet distance
- ``models``     noise-level embeddings, ScoreMLP, score functions, the model factory (build_model)
- ``unet``       the image score network ScoreUNet (NCSN++/DDPM++-style) and its blocks, UNET_PRESETS
- ``ema``        EMA of a network's weights
- ``datasets``   datasets by name: registry, checksum-verified raw-data loaders
- ``data``       prepared-data Parquet I/O and pixel transforms (to_model_space, to_uint8)
- ``atomic``     atomic file writes (atomic_path)
"""

__version__ = "0.1.0"
