"""Several samplers on one model, each scored against the reference: the annealing and samplers stages."""
from __future__ import annotations

from pipeline.generation import generate
from pipeline.quality import describe, sample_quality


def sample_and_score(kind: str, model, configs: dict[str, dict], schedule: dict, n: int, device, seed: int,
                     centered: bool, run, stage: str) -> tuple[dict, dict]:
    """Each named sampler config draws ``n`` samples (all from the same seed) and is scored against the
    reference (pipeline.quality.sample_quality); returns ({name: metrics + nfe, seconds}, {name: samples})."""
    import torch

    results, samples = {}, {}
    for name, cfg in configs.items():
        g = torch.Generator(device=device).manual_seed(seed)  # the same starting noise for every sampler
        x, nfe, seconds = generate(kind, model, cfg, schedule, n, device, g, centered)
        results[name] = {**sample_quality(x, seed, device), "nfe": nfe, "seconds": seconds,
                         "seconds_per_1000": 1000.0 * seconds / n, "sampler": cfg["sampler"]}
        samples[name] = x
        run.log_metrics({f"{name}_{k}": v for k, v in results[name].items() if isinstance(v, (int, float))})
        print(f"[{stage}] {name}: {describe(results[name])}, {nfe} NFE, {seconds:.1f} s", flush=True)
    return results, samples
