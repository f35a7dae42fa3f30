import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xraygan.checkpoint import load_checkpoint
from xraygan.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN,
    STD,
    ClassifierNetConfig,
    TrainClassifierConfig,
    augment_batch,
    build_resnet18,
    class_weight_tensor,
    epoch_order,
    is_done,
    load_classifier,
    load_pretrained,
    train_classifier,
)
from xraygan.errors import InputError, Interrupted
from xraygan.images import save_png
from xraygan.metrics import binary_metrics


def test_metrics_against_hand_computed_confusion():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([.9, .8, .7, .2, .6, .1, .1, .3, .2, .4])
    m = binary_metrics(y, s, 0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 5}
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6) and m["f1"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    # of 24 positive-negative pairs, the positive 0.2 loses to 0.6, 0.3 and 0.4 and ties 0.2
    assert m["roc_auc"] == pytest.approx(20.5 / 24)


def test_metrics_degenerate_cases():
    m = binary_metrics(np.array([1, 0, 1]), np.array([.1, .2, .3]), 0.5)  # no positive predictions
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["specificity"] == 1.0
    one = binary_metrics(np.array([0, 0, 0]), np.array([.1, .9, .3]), 0.5)  # one class only
    assert one["roc_auc"] is None and one["pr_auc"] is None and one["recall"] == 0.0
    assert one["specificity"] == pytest.approx(2 / 3)


def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 30 + [1] * 10)
    w = class_weight_tensor(y, 2, "balanced")
    assert np.allclose(w.numpy(), compute_class_weight("balanced", classes=np.array([0, 1]), y=y))
    assert class_weight_tensor(y, 2, "none") is None
    with pytest.raises(InputError, match="--class-weights heavy"):
        class_weight_tensor(y, 2, "heavy")


def test_small_stem_keeps_resolution_and_pretrained_conversion(tmp_path):
    small = build_resnet18(ClassifierNetConfig(image_size=32, small_stem=True))
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    from torchvision.models import resnet18
    rgb = resnet18(weights=None).state_dict()  # stands in for local ImageNet weights
    save_file({k: v.contiguous() for k, v in rgb.items()}, tmp_path / "r18.safetensors")
    big = build_resnet18(ClassifierNetConfig(image_size=128, small_stem=False))
    skipped = load_pretrained(big, tmp_path / "r18.safetensors")
    assert "fc.weight" in skipped and "conv1.weight" not in skipped  # 1000-class head not used
    # the folded conv1 on our normalised gray input = the RGB conv1 on the gray image replicated and
    # ImageNet-normalised, up to one constant per output channel (removed by the batch norm after it)
    g = torch.rand(2, 1, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = torch.nn.functional.conv2d((g.expand(-1, 3, -1, -1) - mean) / std, rgb["conv1.weight"], stride=2, padding=3)
    ours = big.conv1((g - MEAN) / STD)
    diff = (ours - ref)[:, :, 2:-2, 2:-2]  # away from the zero padding
    assert torch.allclose(diff, diff.mean(dim=(0, 2, 3), keepdim=True).expand_as(diff), atol=1e-4)
    assert diff.abs().max() > 1e-2  # (the constant is real: the check above is not vacuous)
    with pytest.raises(InputError, match="not look like ResNet-18"):
        save_file({"x": torch.zeros(1)}, tmp_path / "junk.safetensors")
        load_pretrained(big, tmp_path / "junk.safetensors")


def test_pretrained_weights_from_training_frameworks_load_and_other_networks_are_refused(tmp_path):
    """A ResNet-18 saved by a training framework (wrapped, keys under a prefix, a 14-finding head,
    no batch norm counters) loads whole; a ResNet-34 (every ResNet-18 name, same shapes, more
    blocks) or a ResNet-50 would load in part and is refused."""
    from torchvision.models import resnet18, resnet34, resnet50

    ref = resnet18(weights=None).state_dict()
    wrapped = {"backbone." + k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    wrapped["backbone.fc.weight"], wrapped["backbone.fc.bias"] = torch.zeros(14, 512), torch.zeros(14)
    torch.save({"model": wrapped, "epoch": 3}, tmp_path / "framework.pth")
    model = build_resnet18(ClassifierNetConfig(image_size=64, small_stem=False))
    not_loaded = load_pretrained(model, tmp_path / "framework.pth")
    assert set(not_loaded) == {"fc.weight", "fc.bias"} | {k for k in ref if k.endswith("num_batches_tracked")}
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    for net, says in ((resnet34, r"tensors ResNet-18 has not, e.g. layer1\.2\..*: a deeper ResNet"),
                      (resnet50, r"does not look like ResNet-18 weights")):
        torch.save(net(weights=None).state_dict(), tmp_path / "other.pth")
        with pytest.raises(InputError, match=says):
            load_pretrained(model, tmp_path / "other.pth")
    torch.save(resnet18(weights=None), tmp_path / "whole.pth")  # the pickled module, not its weights
    with pytest.raises(InputError, match=r"whole\.pth: holds pickled Python objects .* state_dict\(\)"):
        load_pretrained(model, tmp_path / "whole.pth")
    torch.save({"step": torch.zeros(1), "note": "x"}, tmp_path / "none.pth")
    with pytest.raises(InputError, match="no table of tensors"):
        load_pretrained(model, tmp_path / "none.pth")


def test_augment_is_small_and_seeded():
    x = torch.randn(4, 1, 16, 16)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)


@pytest.fixture
def split(tmp_path, rng):
    """Separable 16-px data: pneumonia images are brighter."""
    for part, n in (("train", 24), ("val", 8)):
        for cls, base in (("normal", 60), ("pneumonia", 180)):
            for i in range(n):
                a = np.clip(rng.normal(base, 20, (16, 16)), 0, 255).astype(np.uint8)
                save_png(tmp_path / part / cls / f"{i}.png", a)
    return tmp_path


@pytest.mark.parametrize("select", [None, "f1"])
def test_train_classifier_outputs_and_selection(split, tmp_path, select):
    """The kept epoch is the first with the best validation F1, or the best validation ROC-AUC
    (the default), ties in it going to the lower validation loss."""
    res = train_classifier(TrainClassifierConfig(
        data=split / "train", val=split / "val", out=tmp_path / "clf", epochs=3, batch_size=16,
        class_weights="balanced", device="cpu", patience=0, **({"select": select} if select else {})))
    rows = list(csv.DictReader(open(tmp_path / "clf" / "log.csv")))
    assert len(rows) == 3 and {"train_loss", "val_f1", "val_auc"} <= set(rows[0])
    if select == "f1":
        best = max(range(3), key=lambda i: float(rows[i]["val_f1"]))
    else:
        best = max(range(3), key=lambda i: (float(rows[i]["val_auc"]), -float(rows[i]["val_loss"])))
    assert res["best_epoch"] == best + 1 and f"best_val_{select or 'auc'}" in res
    assert res["warnings"] == []  # a balanced validation set: F1 favours neither class
    _, meta = load_checkpoint(tmp_path / "clf" / "classifier.safetensors", "classifier")
    assert meta["classes"] == ["normal", "pneumonia"] and meta["config"]["small_stem"]
    model, _ = load_classifier(tmp_path / "clf" / "classifier.safetensors", torch.device("cpu"))
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 2)


def test_an_auc_tie_goes_to_the_lower_validation_loss_and_an_f1_tie_to_the_earlier_epoch():
    from xraygan.classifier import improves

    assert improves("auc", 0.91, 9.0, 0.90, 0.1) and not improves("auc", 0.89, 0.01, 0.90, 0.1)
    assert improves("auc", 1.0, 0.2, 1.0, 0.3)  # a perfectly ranked validation set: the loss decides
    assert not improves("auc", 1.0, 0.3, 1.0, 0.3) and not improves("auc", 1.0, 0.4, 1.0, 0.3)
    assert not improves("auc", 1.0, 0.300001, 1.0, 0.3)  # equal as log.csv writes them: resumes decide alike
    assert not improves("f1", 0.8, 0.2, 0.8, 0.3) and improves("f1", 0.81, 0.9, 0.8, 0.3)
    assert improves("auc", 0.5, 0.7, -1.0, float("inf"))  # the first epoch


def test_selecting_by_f1_on_a_mostly_pneumonia_validation_set_is_warned_of():
    from xraygan.classifier import f1_selection_warning

    w = f1_selection_warning({"normal": 134, "pneumonia": 387}, "pneumonia")  # the Kermany release's val
    assert "74% pneumonia (387 of 521)" in w and "F1 0.85" in w and "--select auc" in w
    assert f1_selection_warning({"normal": 134, "pneumonia": 387}, "pneumonia", "--clf-select auc").count(
        "--clf-select auc") == 1
    assert f1_selection_warning({"normal": 260, "pneumonia": 261}, "pneumonia") is None
    assert f1_selection_warning({"normal": 387, "pneumonia": 134}, "pneumonia") is None  # all-pneumonia scores 0.41


def test_pretrained_weights_keep_the_standard_stem_at_small_sizes(split, tmp_path):
    from torchvision.models import resnet18

    save_file({k: v.contiguous() for k, v in resnet18(weights=None).state_dict().items()}, tmp_path / "r18.safetensors")
    res = train_classifier(TrainClassifierConfig(
        data=split / "train", val=split / "val", out=tmp_path / "pre", epochs=1, batch_size=16, device="cpu",
        weights=tmp_path / "r18.safetensors"))
    _, meta = load_checkpoint(tmp_path / "pre" / "classifier.safetensors", "classifier")
    assert not meta["config"]["small_stem"]  # 16 px, --small-stem auto: the stem the weights were made for
    rec = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert res["best_epoch"] == 1 and "conv1.weight" not in rec["pretrained_layers_not_loaded"]


def test_an_epoch_of_k_draws_repeats_no_image_more_than_it_must():
    """k draws from n images: one permutation when k == n (the draw of a one-pass epoch), a random k
    of them when k < n, every image ⌊k/n⌋ or ⌈k/n⌉ times when k > n."""
    def g():
        return torch.Generator().manual_seed(3)

    assert torch.equal(epoch_order(10, 10, g()), torch.randperm(10, generator=g()))
    for k in (4, 10, 25):
        order = epoch_order(10, k, g())
        counts = torch.bincount(order, minlength=10)
        assert len(order) == k and counts.max() - counts.min() <= 1 and counts.max() == -(-k // 10)
    assert not torch.equal(epoch_order(10, 4, g()), epoch_order(10, 4, torch.Generator().manual_seed(4)))


def test_epoch_images_sets_every_epoch_s_steps_and_one_pass_is_the_default(split, tmp_path):
    """48 training images in batches of 16: --epoch-images k trains ceil(k/16) steps of k images an
    epoch; k = 48 is the same run as the default, draw for draw."""
    kw = dict(data=split / "train", val=split / "val", epochs=2, batch_size=16, device="cpu", patience=0)
    for k, steps in ((None, 3), (48, 3), (20, 2), (100, 7)):
        said = []
        train_classifier(TrainClassifierConfig(out=tmp_path / f"k{k}", epoch_images=k, **kw),
                         lambda stage, done, total, **fig: said.append((done, total, fig.get("images"))))
        assert said[-1] == (2 * steps, 2 * steps, 2 * (k or 48))
        rec = json.loads((tmp_path / f"k{k}" / "config.json").read_text())
        assert rec["images_per_epoch"] == (k or 48) and rec["train"]["epoch_images"] == k
        # the checkpoint carries the budget it was given, and the steps to its kept epoch
        _, meta = load_checkpoint(tmp_path / f"k{k}" / "classifier.safetensors", "classifier")
        assert meta["training"] == {"train_images": 48, "images_per_epoch": k or 48, "batch_size": 16,
                                    "steps_per_epoch": steps, "epochs": 2, "steps": meta["epoch"] * steps}
    a, _ = load_checkpoint(tmp_path / "kNone" / "classifier.safetensors", "classifier")
    b, _ = load_checkpoint(tmp_path / "k48" / "classifier.safetensors", "classifier")
    c, _ = load_checkpoint(tmp_path / "k100" / "classifier.safetensors", "classifier")
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    with pytest.raises(InputError, match=r"started with: --epoch-images 100 \(now 20\)"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "k100", resume=True,
                                               **{**kw, "epochs": 3, "epoch_images": 20}))
    with pytest.raises(InputError, match="--epoch-images 1: must be at least 2"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "k1", epoch_images=1, **kw))


def test_steps_per_epoch_skips_a_last_batch_too_small_for_batch_norm():
    from xraygan.classifier import steps_per_epoch

    assert [steps_per_epoch(n, 16) for n in (16, 17, 18, 100, 8)] == [1, 1, 2, 7, 1]
    assert [steps_per_epoch(n, 16, world=2) for n in (19, 20, 33)] == [1, 2, 2]  # two images a process


def test_train_classifier_errors(split, tmp_path, rng):
    base = dict(data=split / "train", val=split / "val", device="cpu", epochs=1)
    with pytest.raises(InputError, match="--positive covid"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "a", positive="covid", **base))
    for i in range(3):
        save_png(tmp_path / "v32" / "normal" / f"{i}.png", np.zeros((32, 32), np.uint8))
        save_png(tmp_path / "v32" / "pneumonia" / f"{i}.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="validation images are 32 px, the training images are 16 px"):
        train_classifier(TrainClassifierConfig(**{**base, "val": tmp_path / "v32"}, out=tmp_path / "b"))
    save_png(tmp_path / "v3" / "covid" / "0.png", np.zeros((16, 16), np.uint8))
    save_png(tmp_path / "v3" / "normal" / "0.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"v3/pneumonia: class folder missing"):
        train_classifier(TrainClassifierConfig(**{**base, "val": tmp_path / "v3"}, out=tmp_path / "c"))
    save_png(tmp_path / "v3" / "pneumonia" / "0.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"v3: unknown class folder\(s\) covid"):
        train_classifier(TrainClassifierConfig(**{**base, "val": tmp_path / "v3"}, out=tmp_path / "c"))


def test_resume_after_interrupt_matches_uninterrupted_run(split, tmp_path):
    from safetensors.torch import load_file

    kw = dict(data=split / "train", val=split / "val", epochs=3, batch_size=16, device="cpu",
              patience=0)
    train_classifier(TrainClassifierConfig(out=tmp_path / "a", **kw))

    def interrupt_in_epoch_2(stage, done, total, **fig):
        if fig.get("epoch") == "2/3":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="keeps its last finished epoch"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "b", **kw), interrupt_in_epoch_2)
    assert len(list(csv.DictReader(open(tmp_path / "b" / "log.csv")))) == 1
    rec = json.loads((tmp_path / "b" / "config.json").read_text())
    del rec["train"]["accumulate"]  # a run recorded before --accumulate existed resumes as its default
    (tmp_path / "b" / "config.json").write_text(json.dumps(rec))
    train_classifier(TrainClassifierConfig(out=tmp_path / "b", resume=True, **kw))
    a = load_file(tmp_path / "a" / "classifier.safetensors")
    b = load_file(tmp_path / "b" / "classifier.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_file(tmp_path / "a" / "state.safetensors"), load_file(tmp_path / "b" / "state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("model."))  # the last epoch too
    la = [r["val_f1"] for r in csv.DictReader(open(tmp_path / "a" / "log.csv"))]
    lb = [r["val_f1"] for r in csv.DictReader(open(tmp_path / "b" / "log.csv"))]
    assert la == lb and len(la) == 3
    with pytest.raises(InputError, match=r"started with: --lr [0-9.e-]+ \(now 0.1\)"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "b", resume=True, **{**kw, "lr": 0.1}))
    with pytest.raises(InputError, match="nothing to resume"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "c", resume=True, **kw))
    # --no-keep-state: an interrupted run keeps all it needs; the finished one its record alone
    with pytest.raises(Interrupted):
        train_classifier(TrainClassifierConfig(out=tmp_path / "d", keep_state=False, **kw), interrupt_in_epoch_2)
    assert load_file(tmp_path / "d" / "state.safetensors").keys() == sa.keys()
    train_classifier(TrainClassifierConfig(out=tmp_path / "d", keep_state=False, resume=True, **kw))
    d = load_file(tmp_path / "d" / "classifier.safetensors")
    assert all(torch.equal(a[k], d[k]) for k in a)
    assert load_file(tmp_path / "d" / "state.safetensors") == {}
    size = (tmp_path / "d" / "state.safetensors").stat().st_size
    assert size < 20_000 < (tmp_path / "a" / "state.safetensors").stat().st_size
    assert is_done(tmp_path / "d", 3, 0) and not is_done(tmp_path / "d", 4, 0)
    train_classifier(TrainClassifierConfig(out=tmp_path / "d", keep_state=False, resume=True, **kw))  # done
    assert all(torch.equal(d[k], v) for k, v in load_file(tmp_path / "d" / "classifier.safetensors").items())
    with pytest.raises(InputError, match="finished after 3 epochs with --no-keep-state, so it kept no training "
                                         "state to continue to --epochs 4"):
        train_classifier(TrainClassifierConfig(out=tmp_path / "d", resume=True, **{**kw, "epochs": 4}))


@pytest.mark.parametrize("small_stem", [True, False])
def test_own_resnet18_is_torchvisions_network_and_seeded_weights(small_stem):
    """xraygan's ResNet-18 has torchvision's parameter names and shapes (its weights and old
    checkpoints load), draws the same initial weights from a seed as the torchvision-based model
    of earlier versions did, and computes the same outputs."""
    from torchvision.models import resnet18

    from xraygan.classifier import ClassifierNetConfig, build_resnet18

    torch.manual_seed(7)
    ref = resnet18(weights=None, num_classes=2)
    if small_stem:
        ref.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        ref.maxpool = torch.nn.Identity()
    else:
        ref.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.manual_seed(7)
    own = build_resnet18(ClassifierNetConfig(num_classes=2, image_size=32, small_stem=small_stem))
    a, b = ref.state_dict(), own.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1, 32, 32)
    ref.train(), own.train()
    assert torch.allclose(ref(x), own(x), atol=1e-5)
    ref.eval(), own.eval()
    assert torch.allclose(ref(x), own(x), atol=1e-5)


def _fault_in_conv1(monkeypatch, when):
    """Make the classifier's first convolution return NaN on the calls `when(call, bf16)` picks:
    the shape of the CPU bf16 kernel faults the training step guards against."""
    import xraygan.classifier as clf

    build, calls = clf.build_resnet18, []

    def build_faulty(net):
        model = build(net)

        def hook(module, inputs, output):
            calls.append(torch.is_autocast_enabled("cpu"))
            if module.training and when(len(calls), calls[-1]):
                return torch.full_like(output, float("nan"))
        model.conv1.register_forward_hook(hook)
        return model

    monkeypatch.setattr(clf, "build_resnet18", build_faulty)
    return calls


def test_a_bf16_fault_is_redone_in_fp32_and_training_goes_on(split, tmp_path, monkeypatch):
    calls = _fault_in_conv1(monkeypatch, lambda n, bf16: bf16 and n in (2, 4))
    res = train_classifier(TrainClassifierConfig(
        data=split / "train", val=split / "val", out=tmp_path / "clf", epochs=1, batch_size=8,
        device="cpu", precision="bf16", patience=0))
    rows = list(csv.DictReader(open(tmp_path / "clf" / "log.csv")))
    assert rows[0]["fp32_steps"] == "2" and res["best_epoch"] == 1
    # calls[0] is the memory check's meta-device pass; then each faulty bf16 step once more in fp32
    assert calls[1:6] == [True, False, True, False, True]
    state, _ = load_checkpoint(tmp_path / "clf" / "classifier.safetensors", "classifier")
    # batch norm's running statistics saw the NaN batch and were put back
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_loss_that_is_not_finite_in_fp32_too_stops_the_run(split, tmp_path, monkeypatch):
    from xraygan.errors import TrainingError

    _fault_in_conv1(monkeypatch, lambda n, bf16: n >= 3)
    with pytest.raises(TrainingError, match=r"epoch 1: training loss is not finite; stopped \(no epoch had "
                                            r"finished, so no model was saved\)"):
        train_classifier(TrainClassifierConfig(
            data=split / "train", val=split / "val", out=tmp_path / "clf", epochs=1, batch_size=8,
            device="cpu", precision="bf16"))


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    """With batch norm on its running statistics (eval mode) the micro-batches' gradients, each
    weighted by its share, add up to the whole batch's: only batch norm's batch statistics differ."""
    from xraygan.classifier import _backward, _Loop
    from xraygan.distributed import Dist

    torch.manual_seed(0)
    x_all = torch.randint(0, 256, (12, 16, 16), dtype=torch.uint8)
    y_all = torch.tensor([0, 1] * 6)
    grads = []
    for k in (1, 3):
        torch.manual_seed(0)
        model = build_resnet18(ClassifierNetConfig(num_classes=2, image_size=16, small_stem=True)).eval()
        cfg = TrainClassifierConfig(data=Path("d"), val=Path("v"), out=Path("o"), batch_size=12, accumulate=k)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loop = _Loop(cfg, Dist(), torch.device("cpu"), model, opt, torch.nn.CrossEntropyLoss(), x_all, y_all,
                     None, False, None, 1)
        loss = _backward(loop, torch.arange(12), None, None)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l1, g1), (l3, g3) = grads
    assert torch.allclose(l1, l3, atol=1e-6) and torch.allclose(g1, g3, atol=1e-6, rtol=1e-4)
