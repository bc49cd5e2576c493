"""The step-equivalence harness (benchmarks/step_equivalence.py) without the original repositories.

Its "ours" side is the real Trainer fed fixed batches: in float64 that must equal a plain
torch.optim.SGD loop with the same recipe, and its comparison must report what differs.
"""
import copy

import pytest
import torch
import torch.nn as nn
import yaml

from benchmarks import step_equivalence as se
from models import build_model

RECIPE = {"model": {"backbone": "cifar_resnet20", "num_classes": 10},
          "data": {"dataset": "synthetic", "input_size": 32},
          "train": {"epochs": 90, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                    "wd_exempt": [], "schedule": "multistep", "milestones": [30, 60], "warmup_epochs": 0},
          "runtime": {"work_dir": None}}


def test_trainer_steps_equal_plain_sgd_in_float64(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(RECIPE))
    torch.manual_seed(0)
    model = build_model(RECIPE["model"]).double()
    reference = copy.deepcopy(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
               for _ in range(3)]
    ours = se.run_ours(str(config), model, batches, 32, str(tmp_path / "work"))
    opt = torch.optim.SGD(reference.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    reference.train()
    for x, y in batches:
        loss = nn.CrossEntropyLoss()(reference(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs = reference.state_dict()
    rows = se.compare(initial, theirs, ours, {k for k, _ in reference.named_parameters()})
    (w, _), (d, _), n = rows["params"]
    assert n == len(list(reference.parameters())) and w < 1e-12 and d < 1e-10


def test_compare_reports_the_worst_tensor_and_splits_buffers():
    initial = {"w": torch.zeros(3), "sc.running_mean": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    theirs = {"w": torch.tensor([1.0, 0, 0]), "sc.running_mean": torch.ones(2), "bn.running_mean": torch.ones(2)}
    ours = {"w": torch.tensor([1.0, 0, 1e-3]), "sc.running_mean": torch.full((2,), 0.5),
            "bn.running_mean": torch.ones(2)}
    rows = se.compare(initial, theirs, ours, {"w"}, (r"^sc\.", "shortcut"))
    assert rows["params"][1] == (pytest.approx(1e-3), "w")
    assert rows["shortcut"][1] == (pytest.approx(0.5), "sc.running_mean")
    assert rows["other buffers"][0] == (0.0, "bn.running_mean")


def test_needs_a_repository(capsys, tmp_path):
    with pytest.raises(SystemExit):
        se.main([])
    assert "give at least one of --cenet, --ednet, --we" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        se.main(["--we", str(tmp_path / "missing")])
    assert "not a directory" in capsys.readouterr().err
