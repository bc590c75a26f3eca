"""scoresde: score-based generative modelling, small and literal.

Modules are named after the math and are imported on demand (``from scoresde import sde``):

- ``sde``        VE / VP / sub-VP SDEs (Song et al., 2021, Sec. 3.4 and App. B)
- ``noise``      geometric noise levels and sigma_1 from data (Song & Ermon, 2019; 2020)
- ``toy``        Gaussian mixtures with exact scores and exact SDE marginals
- ``losses``     exact / sliced / denoising score matching, continuous-time DSM, DDPM eps-loss
- ``sampling``   Langevin, annealed Langevin, probability-flow ODE, EDM Heun; get_sampler (one interface)
- ``pc``         predictors, correctors and the predictor-corrector sampler (score_sde's sampling.py)
- ``likelihood`` exact log-likelihood through the probability-flow ODE, bits/dim
- ``metrics``    mode weights, sliced Wasserstein, Frechet distance
- ``models``     noise-level embeddings, ScoreMLP, score functions, the model factory (build_model)
- ``unet``       the image score network ScoreUNet (NCSN++/DDPM++-style) and its blocks, UNET_PRESETS
- ``ema``        EMA of a network's weights
- ``datasets``   datasets by name: registry, toy and digits, checksums
- ``image_datasets`` MNIST / CIFAR-10 / CelebA loaders (checksum-verified files)
- ``data``       prepared-data Parquet I/O and pixel transforms (to_model_space, to_uint8)
- ``atomic``     atomic file writes (atomic_path)
- ``training``   the training loop (TrainConfig, train), read top to bottom like EDM's training_loop.py
- ``checkpoint`` checkpoint and model files: atomic save, weights-only load, RNG state capture
- ``distributed`` device resolution, DDP setup, per-rank data order
- ``fastpath``   speed knobs resolved per device (fused Adam, multi-tensor EMA, compile, autocast)
- ``classifier`` the small CNN whose features are FID / KID's extractor on small datasets
"""

__version__ = "0.1.0"
