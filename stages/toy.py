"""Stage `toy` (the article's Figure 1): Langevin dynamics with and without annealing on a 2-D mixture.

p = 0.8 N((5, 5), I) + 0.2 N((-5, -5), I), sampled i.i.d., by Langevin dynamics and by annealed Langevin,
with the exact scores and with a ScoreMLP trained by denoising score matching (pipeline.toy explains the
choices). Writes reports/metrics/toy.json::

    {"exact":   {"mode_weight_error":  {"iid": …, "langevin": …, "annealed_langevin": …},
                 "sliced_wasserstein": {"iid": …, "langevin": …, "annealed_langevin": …}},
     "learned": {…same…}}

and reports/figures/toy_exact.png, toy_learned.png.
"""
from __future__ import annotations

from pipeline.io import write_json
from pipeline.params import COMMON
from pipeline.stage import stage_main
from pipeline.toy import FIGURES, METRICS, TOY

SCHEMA = {**COMMON, "toy": TOY}


def run(params: dict, run, args) -> None:
    from pipeline.toy import flat_metrics, run_experiment

    results, seconds, final_loss = run_experiment(params["toy"], params["seed"], run)
    write_json(METRICS, results)
    run.log_metrics({**flat_metrics(results), **{f"seconds_{k}": v for k, v in seconds.items()},
                     "train_final_loss": final_loss})
    run.log_artifact(METRICS, "metrics")
    for path in FIGURES.values():
        run.log_artifact(path, "figures")
    for kind in ("exact", "learned"):
        mwe = results[kind]["mode_weight_error"]
        print(f"[toy] {kind:7s} mode-weight error: iid {mwe['iid']:.4f}, Langevin {mwe['langevin']:.4f}, "
              f"annealed Langevin {mwe['annealed_langevin']:.4f}", flush=True)
    print("[toy] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)


main = stage_main("toy", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
