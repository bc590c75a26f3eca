"""Several samplers on one model, each scored against the reference: the annealing and samplers stages."""
from __future__ import annotations

from pipeline.generation import generate, kept_batches, resume_dir
from pipeline.quality import describe, sample_quality


def sample_and_score(kind: str, model, configs: dict[str, dict], schedule: dict, n: int, device, seed: int,
                     centered: bool, run, stage: str) -> tuple[dict, dict]:
    """Each named sampler config draws ``n`` samples and is scored against the reference
    (pipeline.quality.sample_quality); returns ({name: metrics + nfe, seconds}, {name: samples}).

    Every config starts from the same noise: batch i of each is drawn from seed + i. Finished batches are kept
    under ``checkpoints/samples/<stage>/`` (pipeline.generation.resume_dir), so a rerun after a crash draws
    only the missing ones and gives the same samples and metrics; the stage calls
    ``pipeline.generation.discard_batches(stage)`` once its outputs are written.
    """
    results, samples = {}, {}
    for name, cfg in configs.items():
        where = resume_dir(stage, name, model, cfg, schedule, n, seed, device)
        kept = kept_batches(where)
        x, nfe, seconds = generate(kind, model, cfg, schedule, n, device, None, centered, seed=seed, resume_dir=where)
        results[name] = {**sample_quality(x, seed, device), "nfe": nfe, "seconds": seconds,
                         "seconds_per_1000": 1000.0 * seconds / n, "sampler": cfg["sampler"]}
        samples[name] = x
        run.log_metrics({f"{name}_{k}": v for k, v in results[name].items() if isinstance(v, (int, float))})
        run.log_metrics({f"{name}_resumed_batches": kept})
        print(f"[{stage}] {name}: {describe(results[name])}, {nfe} NFE, {seconds:.1f} s", flush=True)
    return results, samples
