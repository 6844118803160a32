"""The wrong-label latent attack: it succeeds on an intentionally weak model (Carlini et al.'s
sanity check), respects its threat model, and in the matrix writes its report and t-SNE figure."""

from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.base import perturbation_norm
from attacks.wrong_label_latent import choose_wrong_labels, wrong_label_report
from bench.core.config import config_from_dict
from bench.core.registry import create_attack
from bench.core.store import ResultStore
from bench.harness.runner import MatrixRunner


@pytest.fixture(scope="module")
def setup():
    from bench.artifacts import prepare_defense
    from bench.data import load_eval

    data = load_eval("test_tiny", 50, seed=0)
    prep = lambda n: prepare_defense(n, {}, dataset="test_tiny", preset="tiny",  # noqa: E731
                                     log=lambda m: None)[0]
    return prep("test_latent"), prep("test_undefended"), data.images, data.labels


def test_choose_wrong_labels():
    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]])
    y = torch.tensor([0, 2, 0])
    assert choose_wrong_labels(logits, y, "runner-up").tolist() == [1, 1, 1]
    r = choose_wrong_labels(logits.repeat(20, 1), y.repeat(20), "random",
                            torch.Generator().manual_seed(0))
    assert bool((r != y.repeat(20)).all())
    assert choose_wrong_labels(logits, y, 0).tolist() == [1, 0, 1]  # class 0 -> runner-up


def test_succeeds_on_an_intentionally_weak_model(setup, tmp_path):
    """Weak model: the undefended tiny CNN, and a label-DRIVEN semantic autoencoder (the
    ``test_latent`` toy): without a budget the attack must fool the classifier and move every
    latent to the wrong class's region."""
    latent_defense, weak, x, y = setup
    attack = create_attack("wrong_label_latent", threat="none", autoencoder=latent_defense)
    res = attack(weak, x, y, 0.0)
    with torch.no_grad():
        pred = weak(res.adv).argmax(1)
    wrong = torch.tensor(res.extras["latent"]["wrong_labels"])
    assert bool((wrong != y).all())
    assert float((pred != y).float().mean()) >= 0.6
    assert float((pred == wrong).float().mean()) >= 0.4  # often exactly the wrong label
    lat = res.extras["latent"]
    rep = wrong_label_report(lat["z_clean"], lat["z_wrong"], lat["labels"], lat["wrong_labels"],
                             distances=res.extras["image_distances"],
                             figure_path=tmp_path / "tsne", seed=0)
    assert rep["latent"]["clean_nearest_true"] >= 0.9
    assert rep["latent"]["wrong_nearest_wrong"] >= 0.9  # latents moved to the wrong class
    assert rep["latent"]["wrong_distance_to_wrong_centroid"] < rep["latent"][
        "wrong_distance_to_true_centroid"]
    assert set(rep["image"]) == {"linf", "l2", "psnr", "ssim"} and rep["image"]["ssim"] > 0.5
    assert set(rep["probe"]) >= {"clean_accuracy", "shifted_accuracy", "predicts_wrong_label"}
    for p in rep["figures"]:
        assert Path(p).exists() and Path(p).stat().st_size > 0
    assert {Path(p).suffix for p in rep["figures"]} == {".png", ".svg"}


@pytest.mark.parametrize("threat,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_projected_to_the_ball(setup, threat, eps):
    latent_defense, weak, x, y = setup
    res = create_attack("wrong_label_latent", threat=threat, autoencoder=latent_defense)(
        weak, x, y, eps)
    assert bool((perturbation_norm(res.adv, x, threat) <= eps + 1e-6).all())
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    d = res.extras["image_distances"]
    assert np.allclose(d[threat], perturbation_norm(res.adv, x, threat).tolist(), atol=1e-5)


def test_in_the_matrix_report_and_figure_are_stored(tmp_path):
    cfg = config_from_dict({
        "name": "wll", "datasets": ["test_tiny"], "n": 20, "batch_size": 10,
        "defenses": ["test_latent", "test_undefended"],
        "attacks": [{"name": "wrong_label_latent", "autoencoder": "test_latent",
                     "label": "wll (fitted AE)"}],
        "threat_models": {"linf": ["8/255"]}, "fit_preset": "tiny", "device": "cpu",
        "run_dir": str(tmp_path / "run"),
        "adaptive": {"transfer": False, "pgd_steps": 2}})
    MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    cells = {(c.defense, c.attack): c for c in store.cells()}
    # listed explicitly: runs against every defense, with the fitted autoencoder
    for d in ("test_latent", "test_undefended"):
        rep = cells[(d, "wll (fitted AE)")].metrics["report"]
        assert rep["n"] == 20 and rep["latent"]["wrong_nearest_wrong"] >= 0.9
        assert all(Path(p).exists() for p in rep["figures"])
        assert all(str(tmp_path / "run" / "figures") in p for p in rep["figures"])
    # listed explicitly, so not added a second time for the latent defense
    assert not any(a == "wrong-label latent" for _, a in cells)


def test_added_automatically_for_latent_defenses(setup):
    from bench.core.config import ComponentSpec, DatasetSpec
    from bench.harness.adaptive_policy import adaptive_plans
    from bench.harness.planning import CellPlan

    latent_defense, weak, _, _ = setup
    ds, pgd = DatasetSpec("test_tiny", 20), ComponentSpec("test_pgd")
    plans = [CellPlan(ds, ComponentSpec("test_latent"), None, "none", 0.0),
             CellPlan(ds, ComponentSpec("test_latent"), pgd, "linf", 8 / 255),
             CellPlan(ds, ComponentSpec("test_latent"), pgd, "l2", 0.5)]
    extra = adaptive_plans(latent_defense, plans)
    assert [(p.attack.label, p.threat) for p in extra if p.attack.name == "wrong_label_latent"
            ] == [("wrong-label latent", "linf"), ("wrong-label latent", "l2")]
    assert not any(p.attack.name == "wrong_label_latent" for p in adaptive_plans(weak, plans))
    mine = plans + [CellPlan(ds, ComponentSpec("test_latent"),
                             ComponentSpec("wrong_label_latent", {}, "mine"), "linf", 8 / 255)]
    assert not any(p.attack.label == "wrong-label latent" for p in adaptive_plans(latent_defense,
                                                                                   mine))


def test_moves_the_latent_of_a_small_trained_semantic_ae(tmp_path):
    """Not the toy: a small semantic AE TRAINED on test_tiny (a few seconds). Within Linf 8/255
    the attack's x' stays close to x while its latents E(x, y') sit at the wrong class's
    centroid, the latent probe (fitted on clean latents) follows y', the k-means clusters
    change, and the picture grid is written. Fails if the encoder ignores the label."""
    from attacks.wrong_label_latent import picture_grid
    from bench.core.registry import DEFENSES
    from bench.data import load_eval, load_train

    torch.set_num_threads(1)
    train, test = load_train("test_tiny", limit=500), load_eval("test_tiny", 100)
    sem = DEFENSES.create("test_semantic_ae", classifier="test_tiny_cnn@tiny", epochs=3)
    sem.fit(train, progress=False).eval()
    attack = create_attack("wrong_label_latent", threat="linf", autoencoder=sem)
    with torch.no_grad():
        res = attack(sem, test.images, test.labels, 8 / 255)
    lat = res.extras["latent"]
    rep = wrong_label_report(lat["z_clean"], lat["z_wrong"], lat["labels"], lat["wrong_labels"],
                             distances=res.extras["image_distances"], seed=0)
    assert rep["image"]["linf"] <= 8 / 255 + 1e-6 and rep["image"]["psnr"] > 28
    assert rep["latent"]["clean_nearest_true"] >= 0.9
    assert rep["latent"]["wrong_nearest_wrong"] >= 0.8
    assert rep["probe"]["predicts_wrong_label"] >= 0.8
    assert rep["clustering"]["assignment_changed"] >= 0.8
    # the plain twin has nothing to exploit: the attack refuses it
    plain = DEFENSES.create("test_plain_ae", classifier="test_tiny_cnn@tiny", epochs=1)
    with pytest.raises(ValueError, match="label-conditioned"):
        create_attack("wrong_label_latent", threat="linf", autoencoder=plain.fit(
            train.subset(range(100)), progress=False))(plain, test.images[:4],
                                                        test.labels[:4], 8 / 255)
    paths = picture_grid(test.images, res.adv, tmp_path / "grid")
    assert all(p.stat().st_size > 1000 for p in paths)
