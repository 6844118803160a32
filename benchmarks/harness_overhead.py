"""Harness overhead: a PGD cell and an AutoAttack (cheap) cell through the harness vs the direct
library calls on the same model, data and seed.

    python benchmarks/harness_overhead.py [--rounds 5] [--n 100]

Model and data: the akamaster ResNet-20 on the 100 lossless CIFAR-10 test images when both are
present (../shared), else the tiny test CNN on synthetic test_tiny images. Measured, interleaved
in one process, per round:

* ``direct``: torchattacks.PGD / pyautoattack.AutoAttack called by hand, plus the one forward
  pass a user needs to score the adversarials (AutoAttack scores internally);
* ``direct_attack_only``: the same without the scoring forward (PGD only);
* ``attack_batch``: :func:`bench.harness.scoring.attack_batch` (the harness's batch step: pass
  counting and tracing, the epsilon-ball check, fp32 re-scoring, best-iterate recovery);
* ``runner``: a one-cell matrix through :class:`bench.harness.runner.MatrixRunner` in a fresh run
  directory (data from the decoded cache, defense build, clean cell, defense checks, the cell,
  the store, the adversarials on disk): the figure a user sees.

Target: attack_batch / direct <= 1.05.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from _common import fmt_ratio, interleaved, ratio_stats, write_result


def setup(n: int):
    from bench.artifacts import prepare_defense
    from bench.data import load_eval

    try:
        data = load_eval("cifar10", n, source="lossless-csv")
        defense, _ = prepare_defense("undefended", {"classifier": "akamaster-resnet20"},
                                     dataset="cifar10", log=lambda m: None)
        ds = {"name": "cifar10", "n": n, "source": "lossless-csv"}
        de = {"name": "undefended", "classifier": "akamaster-resnet20"}
        what = "akamaster ResNet-20, CIFAR-10 lossless CSV"
    except Exception as exc:  # noqa: BLE001 - any missing file: fall back to the synthetic set
        print(f"(akamaster/lossless CSV unavailable: {exc}; using test_tiny)")
        n = min(n, 20)
        data = load_eval("test_tiny", n)
        defense, _ = prepare_defense("test_undefended", {}, dataset="test_tiny", preset="tiny",
                                     log=lambda m: None)
        ds = {"name": "test_tiny", "n": n}
        de = {"name": "test_undefended"}
        what = "test_undefended tiny CNN, test_tiny"
    return data, defense, ds, de, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: least disturbed by other load on a shared machine)")
    ap.add_argument("--only", choices=["pgd", "autoattack"], help="one of the two cells")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import torchattacks
    from pyautoattack import AutoAttack as LibAutoAttack

    from bench.core.config import ComponentSpec, config_from_dict
    from bench.harness.planning import create_attack
    from bench.harness.runner import MatrixRunner
    from bench.harness.scoring import attack_batch, score

    data, defense, ds, de, what = setup(args.n)
    x, y = data.images, data.labels
    eps, seed = 8 / 255, 0
    clean = score(defense, x, y, draws=5, seed=seed)
    print(f"{what}: {len(y)} images, clean accuracy {float(clean.correct.float().mean()):.3f}, "
          f"torch threads {torch.get_num_threads()}")
    tmp = Path(tempfile.mkdtemp(prefix="rm-overhead-"))
    result: dict = {"setup": what, "n": len(y), "rounds": args.rounds, "cells": {}}

    cells = {
        "pgd": ({"name": "pgd", "steps": 10}, "PGD-10 Linf 8/255"),
        "autoattack": ({"name": "autoattack_cheap"}, "AutoAttack cheap (APGD-CE + APGD-T, 20 it, "
                                                     "3 targets) Linf 8/255"),
    }
    # count the samples that go through the model, forward and backward, in each variant: the
    # compute overhead of the harness without the noise of a shared machine
    count = {"fwd": 0, "bwd": 0}

    def fwd_hook(module, inputs, output):
        count["fwd"] += int(inputs[0].shape[0])
        if output.requires_grad:
            n = int(inputs[0].shape[0])
            output.register_hook(lambda g: count.__setitem__("bwd", count["bwd"] + n))

    defense.register_forward_hook(fwd_hook)

    def counted(fn):
        count["fwd"] = count["bwd"] = 0
        out = fn()
        return dict(count), out

    for cell, (spec, title) in cells.items():
        if args.only and cell != args.only:
            continue
        attack = create_attack(ComponentSpec(spec["name"], {k: v for k, v in spec.items()
                                                            if k != "name"}), "linf", seed=seed)
        last: dict[str, torch.Tensor] = {}

        if cell == "pgd":
            def direct_attack():
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    atk = torchattacks.PGD(defense, eps=eps, alpha=2.5 * eps / 10, steps=10,
                                           random_start=True)
                    last["direct"] = atk(x, y)
                    return last["direct"]

            def direct():
                adv = direct_attack()
                with torch.no_grad():
                    return (defense(adv).argmax(1) == y).float().mean()
        else:
            def direct():  # AutoAttack scores the clean and adversarial inputs itself
                aa = LibAutoAttack(defense, norm="Linf", eps=eps, seed=seed, device="cpu",
                                   version="custom", attacks=["apgd-ce", "apgd-t"])
                aa.apgd.n_iter = aa.apgd_targeted.n_iter = 20
                aa.apgd_targeted.n_target_classes = 3
                aa.logger.disabled = True
                last["direct"], _ = aa.run_standard_evaluation(x, y, batch_size=len(y))
            direct_attack = None

        def harness():
            rows, last["attack_batch"], _ = attack_batch(defense, attack, x, y, eps, clean=clean,
                                                         seed=seed, draws=5)
            return rows

        counter = [0]

        def runner():
            counter[0] += 1
            run_dir = tmp / f"{cell}-{counter[0]}"
            cfg = config_from_dict({"name": "overhead", "datasets": [ds], "defenses": [de],
                                    "attacks": [spec], "threat_models": {"linf": [eps]},
                                    "batch_size": len(y), "device": "cpu",
                                    "run_dir": str(run_dir)})
            MatrixRunner(cfg, progress=False, log=lambda m: None).run()
            shutil.rmtree(run_dir, ignore_errors=True)

        fns = {"direct": direct, "attack_batch": harness, "runner": runner}
        if direct_attack is not None:
            fns["direct_attack_only"] = direct_attack
        passes = {n: counted(fns[n])[0] for n in ("direct", "attack_batch")}
        print(f"\n{title}")
        cpu: dict[str, list[float]] = {}
        times = interleaved(fns, args.rounds, cpu=cpu, warmup=0)
        with torch.no_grad():
            acc = {n: float((defense(a).argmax(1) == y).float().mean()) for n, a in last.items()}
        fb = {n: p["fwd"] + 2 * p["bwd"] for n, p in passes.items()}  # backward ~ 2 forwards
        r = {"title": title, "times": times, "cpu_times": cpu, "sample_passes": passes,
             "attack_batch/direct": ratio_stats(times["attack_batch"], times["direct"]),
             "attack_batch/direct_cpu": ratio_stats(cpu["attack_batch"], cpu["direct"]),
             "attack_batch/direct_compute": fb["attack_batch"] / fb["direct"],
             "runner/direct": ratio_stats(times["runner"], times["direct"]),
             "robust_accuracy": acc}
        if "direct_attack_only" in times:
            r["attack_batch/direct_attack_only"] = ratio_stats(times["attack_batch"],
                                                               times["direct_attack_only"])
        result["cells"][cell] = r
        print(fmt_ratio("  attack_batch / direct, wall", r["attack_batch/direct"], "<= 1.05"))
        print(fmt_ratio("  attack_batch / direct, CPU time", r["attack_batch/direct_cpu"]))
        print(f"  samples through the model: direct {passes['direct']}, attack_batch "
              f"{passes['attack_batch']} -> compute ratio (backward = 2 forwards) "
              f"{r['attack_batch/direct_compute']:.3f}")
        if "attack_batch/direct_attack_only" in r:
            print(fmt_ratio("  attack_batch / direct attack without scoring, wall",
                            r["attack_batch/direct_attack_only"]))
        print(fmt_ratio("  one-cell MatrixRunner run / direct, wall", r["runner/direct"]))
        print(f"  robust accuracy: {acc}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nfigures written to {write_result('harness_overhead', result)}")


if __name__ == "__main__":
    main()
