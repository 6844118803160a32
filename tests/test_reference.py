"""Reference figures through the harness (METHODS.md, "Reference figures measured here"):
the akamaster ResNet-20 checkpoint, evaluated by robustmatrix, reproduces its clean accuracy
on the 100 lossless images (94.0%) and on the first 100 JPEG test images per class (80.4%),
and PGD at 8/255 drives it to about 0%."""

import pytest
import torch

from bench.core.paths import weights_roots

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def resnet20(shared_data):
    if not any((r / "akamaster-resnet20-12fca82f.th").exists() for r in weights_roots()):
        pytest.skip("akamaster ResNet-20 weights are absent")
    from defenses.undefended import Undefended

    return Undefended(dataset="cifar10", classifier="akamaster-resnet20").eval()


def test_clean_and_pgd_on_lossless_images(resnet20, tmp_path):
    from bench.core.config import config_from_dict
    from bench.core.store import ResultStore
    from bench.harness.runner import MatrixRunner
    from leaderboard.table import build_records

    cfg = config_from_dict({
        "name": "reference", "datasets": [{"name": "cifar10", "n": 100, "source": "lossless-csv"}],
        "defenses": [{"name": "undefended", "classifier": "akamaster-resnet20"}],
        "attacks": [{"name": "pgd", "steps": 10}], "threat_models": {"linf": ["8/255"]},
        "device": "cpu", "run_dir": str(tmp_path / "run")})
    MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    (rec,) = build_records(ResultStore(tmp_path / "run" / "results.sqlite"))
    assert rec["n"] == 100
    assert rec["clean"]["k"] == 94  # the reference figure, exactly
    assert rec["worst_case"]["accuracy"] <= 0.02  # "about 0%" (reference PGD-20: 0.0)


def test_clean_accuracy_on_jpeg_test_images(resnet20):
    from bench.data import load_split
    from bench.harness.scoring import score

    data = load_split("cifar10", "test")
    keep = [i for i, s in enumerate(data.sample_ids) if int(s.rsplit("/", 1)[1]) < 100]
    sub = data.subset(torch.tensor(keep))
    assert len(sub) == 1000
    correct = torch.cat([score(resnet20, sub.images[i:i + 250], sub.labels[i:i + 250]).correct
                         for i in range(0, 1000, 250)])
    assert abs(correct.float().mean().item() - 0.804) <= 0.005
