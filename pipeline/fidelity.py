"""FID / KID through torch-fidelity, with our trained classifier or Inception-v3 as the feature extractor.

- :class:`ClassifierFeatureExtractor` wraps :class:`scoresde.classifier.SmallCNN` as a torch-fidelity
  ``FeatureExtractorBase``: it takes uint8 ``Bx3xHxW`` images (torch-fidelity's input convention),
  maps them to the classifier's channels / size and returns the penultimate-layer ``features`` (used
  for FID and KID) and the ``logits``. :func:`register_classifier` registers it under
  ``"<dataset>_cnn"`` (e.g. ``digits_cnn``).
- :func:`resolve_inception` decides whether Inception-v3 can be used: a weights file named by
  ``evaluate.inception_weights``, torch's hub cache, or torch-fidelity's own download. Offline, that
  download fails with a URLError after ~2 s: we catch it, fall back to the classifier, and say so
  (the log line, the ``extractor_fallback`` tag, and metric names carrying the extractor name).
- :func:`reference_statistics` computes the real-data features once (``fid_ref`` stage, saved in
  ``data/fid/ref_stats.npz``); :func:`compute_fid_kid` runs ``torch_fidelity.calculate_metrics`` on
  the samples against that reference. The reference is handed to torch-fidelity through its own
  input2 cache (features + FID statistics files, seeded from the npz into a temporary cache root),
  and the input2 Dataset refuses to be read: the reference is never recomputed at evaluation time.

Metric names say how they were made: ``fid_<extractor>_n<samples>``, ``kid_<extractor>_n<samples>``
(``kid_std_...`` its spread over subsets), with ``<extractor>`` = ``inception`` or ``<dataset>_cnn``.
"""
from __future__ import annotations

import pickle
import socket
import sys
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
from torch_fidelity.utils_torch import torch_atomic_save

INCEPTION = "inception-v3-compat"          # torch-fidelity's registered name
INCEPTION_LAYER = "2048"                   # pool3 features
CLASSIFIER_LAYER = "features"
_REF_CACHE_NAME = "scoresde_ref"

def extractor_name(dataset: str) -> str:
    """Registered name of the classifier extractor of ``dataset`` (``digits`` -> ``digits_cnn``)."""
    return f"{dataset}_cnn"


def metric_tag(extractor: str) -> str:
    """Short extractor name used in metric names (``inception`` for Inception-v3)."""
    return "inception" if extractor == INCEPTION else extractor


def feature_layer(extractor: str) -> str:
    return INCEPTION_LAYER if extractor == INCEPTION else CLASSIFIER_LAYER


def metric_names(extractor: str, n: int) -> dict[str, str]:
    tag = metric_tag(extractor)
    return {"fid": f"fid_{tag}_n{n}", "fid_std": f"fid_{tag}_n{n}_std", "kid": f"kid_{tag}_n{n}",
            "kid_std": f"kid_std_{tag}_n{n}"}


# ------------------------------------------------------------------ datasets
class UInt8Images(Dataset):
    """uint8 images ``(N, C, H, W)`` served as torch-fidelity wants them: uint8 ``3xHxW`` tensors."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


class _CachedReference(Dataset):
    """Stands for the reference set in torch-fidelity's input2 slot; its features come from the cache only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        raise RuntimeError("reference images were requested: the reference features must come from "
                           "data/fid/ref_stats.npz (torch-fidelity cache miss)")


# ------------------------------------------------------------ our extractor
class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a trained :class:`SmallCNN`.

    torch-fidelity instantiates extractors itself (``cls(name, features_list, **kwargs)``), so the
    trained network is bound as the class attribute ``net_`` of a per-name subclass made by
    :func:`register_classifier`.
    """

    net_: torch.nn.Module | None = None

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        if type(self).net_ is None:
            raise RuntimeError(f"feature extractor {name!r} has no classifier bound (use register_classifier)")
        self.net = type(self).net_

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        """uint8 Bx3xHxW -> (features, logits) in the order requested (the classifier maps channels/size)."""
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 Bx3xHxW, got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        feats, logits = self.net.features(x.float() / 255.0)
        out = {"features": feats.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


def register_classifier(name: str, model: torch.nn.Module) -> str:
    """Register ``model`` (a SmallCNN) as torch-fidelity feature extractor ``name``; returns ``name``.

    Re-registering a name we registered before rebinds it to the new model (torch-fidelity itself
    refuses duplicates); a name owned by torch-fidelity (``inception-v3-compat``, ...) is refused.
    """
    model = model.eval()
    cls = type(f"ClassifierFeatureExtractor_{name}", (ClassifierFeatureExtractor,), {"net_": model})
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is None:
        register_feature_extractor(name, cls)
    elif isinstance(existing, type) and issubclass(existing, ClassifierFeatureExtractor):
        FEATURE_EXTRACTORS_REGISTRY[name] = cls
    else:
        raise ValueError(f"feature extractor name {name!r} is taken by torch-fidelity")
    return name


def load_classifier(path: str | Path, device: torch.device | str = "cpu"):
    """Load models/classifier.pt -> (SmallCNN in eval mode, checkpoint dict without the state_dict)."""
    from scoresde.classifier import build_classifier

    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("model") is None:
        raise ValueError(f"{path} holds no classifier ({ckpt.get('skipped', 'no model')})")
    model = build_classifier(ckpt["config"], ckpt["model"]).to(device)
    info = {k: v for k, v in ckpt.items() if k != "model"}
    return model, info


def prepare_extractor(name: str, extra: dict, classifier: str | Path, device: torch.device | str = "cpu") -> str | None:
    """Make extractor ``name`` of a cached reference usable; returns the weights path to pass on (Inception only).

    Inception-v3 uses the weights file the ``fid_ref`` stage resolved (kept in the reference's ``extra``);
    a classifier extractor is loaded from ``classifier`` and registered with torch-fidelity under ``name``.
    """
    if name == INCEPTION:
        return str(extra["inception_weights"]) or None
    model, _ = load_classifier(classifier, device)
    register_classifier(name, model)
    return None


# ---------------------------------------------------------------- Inception
def default_inception_file() -> Path:
    """Where torch.hub (and so torch-fidelity) looks for the Inception weights it would download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


class UnsafeWeightsError(RuntimeError):
    """A weights file whose unpickling would construct arbitrary objects (it is never loaded)."""


def resolve_inception(weights_path: str | None, download: bool = True, timeout_s: float = 20.0
                      ) -> tuple[bool, str | None, str]:
    """Can Inception-v3 be used? Returns ``(ok, weights_path_for_torch_fidelity, message)``.

    Order: the configured file; torch's hub cache; torch-fidelity's download (when ``download``).
    Every failure is caught and explained in ``message`` (the caller falls back to the classifier).
    """
    def probe(path):
        if path is not None:
            # torch-fidelity unpickles the file with weights_only=False: vet it as plain tensors first, so a
            # file that would run code when unpickled is refused instead of executed.
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise UnsafeWeightsError(f"{path} holds more than tensors (refusing to unpickle it): {err}") from None
        model = FeatureExtractorInceptionV3(INCEPTION, [INCEPTION_LAYER], feature_extractor_weights_path=path,
                                            verbose=False)
        del model

    if weights_path:
        if not Path(weights_path).is_file():
            return False, None, (f"evaluate.inception_weights: {weights_path} does not exist; "
                                 f"falling back to the classifier")
        try:
            probe(weights_path)
            return True, str(weights_path), f"Inception-v3 weights from {weights_path}"
        except Exception as err:  # noqa: BLE001 - a corrupt file must not stop the evaluation
            return False, None, f"Inception-v3 weights {weights_path} unusable ({type(err).__name__}: {err}); falling back to the classifier"
    cached = default_inception_file()
    if cached.is_file():
        try:
            probe(str(cached))
            return True, str(cached), f"Inception-v3 weights from torch hub cache {cached}"
        except Exception as err:  # noqa: BLE001
            return False, None, f"Inception-v3 weights {cached} unusable ({type(err).__name__}: {err}); falling back to the classifier"
    if not download:
        return False, None, "no Inception-v3 weights configured (evaluate.inception_weights) and download disabled; using the classifier"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        probe(None)  # torch-fidelity's own download into the hub cache
        return True, str(cached) if cached.is_file() else None, "Inception-v3 weights downloaded by torch-fidelity"
    except (urllib.error.URLError, OSError, TimeoutError, RuntimeError) as err:
        reason = getattr(err, "reason", err)
        return False, None, (f"Inception-v3 weights unavailable (torch-fidelity download failed: "
                             f"{type(err).__name__}: {reason}); falling back to the classifier")
    finally:
        socket.setdefaulttimeout(old)


# ---------------------------------------------------------------- reference
@dataclass
class Reference:
    """Real-data features of one extractor, and their FID statistics (torch-fidelity's dtypes)."""

    extractor: str
    layer: str
    features: np.ndarray        # (N, D) float32
    mu: np.ndarray              # (D,) float32
    sigma: np.ndarray           # (D, D) float64

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _fe_kwargs(cuda: bool, weights_path: str | None, verbose: bool = False) -> dict:
    kw = {"cuda": cuda, "verbose": verbose}
    if weights_path:
        kw["feature_extractor_weights_path"] = weights_path
    return kw


def extract_features(images_uint8: torch.Tensor | np.ndarray, extractor: str, *, cuda: bool = False,
                     batch_size: int = 256, weights_path: str | None = None) -> np.ndarray:
    """Features (float32, (N, D)) of uint8 images with a registered extractor, the way torch-fidelity does it."""
    layer = feature_layer(extractor)
    fe = create_feature_extractor(extractor, [layer], **_fe_kwargs(cuda, weights_path))
    feats = get_featuresdict_from_dataset(UInt8Images(images_uint8), fe, batch_size, cuda, True, False)[layer]
    return feats.float().numpy()


def reference_statistics(images_uint8: torch.Tensor | np.ndarray, extractor: str, *, cuda: bool = False,
                         batch_size: int = 256, weights_path: str | None = None) -> Reference:
    feats = extract_features(images_uint8, extractor, cuda=cuda, batch_size=batch_size, weights_path=weights_path)
    stats = fid_features_to_statistics(torch.from_numpy(feats))
    return Reference(extractor, feature_layer(extractor), feats, stats["mu"], stats["sigma"])


def save_references(path: str | Path, refs: list[Reference], **extra) -> None:
    """Write references (one per extractor) and extra arrays/strings to an npz (``path`` as given)."""
    arrays: dict[str, np.ndarray] = {"extractors": np.array([r.extractor for r in refs], dtype=str)}
    for r in refs:
        arrays[f"{r.extractor}__layer"] = np.array(r.layer)
        arrays[f"{r.extractor}__features"] = r.features.astype(np.float32)
        arrays[f"{r.extractor}__mu"] = r.mu
        arrays[f"{r.extractor}__sigma"] = r.sigma
    for key, value in extra.items():
        arrays[key] = np.asarray(value)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_references(path: str | Path) -> tuple[dict[str, Reference], dict[str, np.ndarray]]:
    """Read an npz written by :func:`save_references` -> ({extractor: Reference}, other arrays)."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    refs = {}
    for name in [str(e) for e in data.pop("extractors", np.array([], dtype=str))]:
        refs[name] = Reference(name, str(data.pop(f"{name}__layer")), data.pop(f"{name}__features"),
                               data.pop(f"{name}__mu"), data.pop(f"{name}__sigma"))
    return refs, data


def _seed_cache(cache_root: Path, ref: Reference, extractor: str) -> None:
    """Write ``ref`` in torch-fidelity's cache layout (features + FID statistics of input2)."""
    prefix = f"{_REF_CACHE_NAME}-{extractor}"
    torch_atomic_save(torch.from_numpy(np.ascontiguousarray(ref.features, dtype=np.float32)),
                      str(cache_root / f"{prefix}-features-{ref.layer}.pt"))
    torch_atomic_save({"mu": ref.mu, "sigma": ref.sigma}, str(cache_root / f"{prefix}-stat-fid-{ref.layer}.pt"))


def compute_fid_kid(samples_uint8: torch.Tensor | np.ndarray, reference: Reference, extractor: str, n: int | None = None,
                    *, cuda: bool = False, batch_size: int = 256, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0, weights_path: str | None = None,
                    verbose: bool = False, fid_bootstrap_n: int = 0) -> dict[str, float]:
    """FID and KID of the first ``n`` samples against ``reference``, via ``torch_fidelity.calculate_metrics``.

    Returns ``{fid_<tag>_n<n>, kid_<tag>_n<n>, kid_std_<tag>_n<n>}``, and with ``fid_bootstrap_n`` > 0 also
    ``fid_<tag>_n<n>_std``: the standard deviation of :func:`fid_bootstrap` over that many resamples of the
    samples' features (extracted once more, the way torch-fidelity does). ``kid_subset_size`` is capped at
    ``min(n, reference.n)`` (torch-fidelity refuses larger subsets).
    """
    if reference.extractor != extractor:
        raise ValueError(f"reference was computed with {reference.extractor!r}, not {extractor!r}")
    samples = torch.as_tensor(samples_uint8)
    n = len(samples) if n is None else int(n)
    if n < 2 or n > len(samples):
        raise ValueError(f"need 2 <= n <= {len(samples)} samples, got n={n}")
    subset = max(2, min(int(kid_subset_size), n, reference.n))
    with tempfile.TemporaryDirectory(prefix="fidelity_cache_") as tmp:
        _seed_cache(Path(tmp), reference, extractor)
        out = torch_fidelity.calculate_metrics(
            input1=UInt8Images(samples[:n]), input2=_CachedReference(reference.n),
            input2_cache_name=_REF_CACHE_NAME, cache_root=tmp, cache=True,
            feature_extractor=extractor, feature_layer_fid=reference.layer, feature_layer_kid=reference.layer,
            fid=True, kid=True, isc=False, prc=False, kid_subsets=int(kid_subsets), kid_subset_size=subset,
            rng_seed=int(seed), batch_size=int(batch_size), save_cpu_ram=True,
            **_fe_kwargs(cuda, weights_path, verbose))
    names = metric_names(extractor, n)
    result = {names["fid"]: float(out[torch_fidelity.KEY_METRIC_FID]),
              names["kid"]: float(out[torch_fidelity.KEY_METRIC_KID_MEAN]),
              names["kid_std"]: float(out[torch_fidelity.KEY_METRIC_KID_STD])}
    if fid_bootstrap_n > 0:
        feats = extract_features(samples[:n], extractor, cuda=cuda, batch_size=batch_size, weights_path=weights_path)
        result[names["fid_std"]] = float(np.std(fid_bootstrap(feats, reference, fid_bootstrap_n, seed), ddof=1))
    return result


def fid_bootstrap(sample_features: np.ndarray, reference: Reference, n_boot: int, seed: int) -> np.ndarray:
    """FID of ``n_boot`` bootstrap resamples of the generated samples' features against the fixed reference.

    Each replicate draws n of the n sample feature vectors with replacement (numpy Generator seeded
    ``seed``), fits their Gaussian (mean, covariance) and takes the Fréchet distance to the reference
    statistics. Their standard deviation is the sampling uncertainty of the FID *from the finite generated
    set*; the reference's own finite size is shared by every model scored against it and left out.
    """
    from scoresde.metrics import feature_statistics, frechet_distance

    f = np.asarray(sample_features, dtype=np.float64)
    rng = np.random.default_rng(int(seed))
    out = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        mu, sigma = feature_statistics(f[rng.integers(0, len(f), len(f))])
        out[b] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    return out


def log(message: str, stage: str = "evaluate") -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
