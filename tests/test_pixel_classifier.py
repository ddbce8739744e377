"""PixelEnsemble, vectorized training, PixelStore, prediction and save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from diffseg_hf.errors import CheckpointError, DataError
from diffseg_hf.pixel_classifier import (
    PixelEnsemble,
    PixelStore,
    drop_small_classes,
    fit_ensemble,
    fit_members_sequential,
    load_classifier,
    predict,
    save_classifier,
)


def _toy(p: int = 300, d: int = 12, c: int = 4, seed: int = 0, signal: float = 2.0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (p,), generator=g)
    features = torch.randn(p, d, generator=g)
    features[:, :c] += signal * nn.functional.one_hot(labels, c)  # separable for large signal
    return features, labels


def _constant_members(class_logits: list[list[float]], d: int = 5) -> PixelEnsemble:
    """Members whose output ignores the input: last Linear has zero weight and bias = given logits."""
    members = []
    for logits in class_logits:
        m = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 32), nn.ReLU(),
                          nn.BatchNorm1d(32), nn.Linear(32, len(logits)))
        nn.init.zeros_(m[-1].weight)
        m[-1].bias.data = torch.tensor(logits)
        members.append(m)
    return PixelEnsemble.from_members(members).eval()


def test_architecture_and_member_round_trip():
    assert PixelEnsemble(2, 7, 29).hidden == (128, 32)
    assert PixelEnsemble(2, 7, 30).hidden == (256, 128)
    ens = PixelEnsemble(3, 7, 5)
    ens.reset_parameters(torch.Generator().manual_seed(0))
    w = ens.layers[0].weight
    assert abs(float(w.detach().std()) - 0.02) < 0.003 and float(ens.layers[0].bias.detach().abs().max()) == 0.0
    members = ens.to_members()
    assert [type(m).__name__ for m in members[0]] == ["Linear", "ReLU", "BatchNorm1d"] * 2 + ["Linear"]
    back = PixelEnsemble.from_members(members)
    for key, value in ens.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(16, 7)
    want = torch.stack([m(x) for m in members])  # (E, B, C) with batch statistics
    torch.testing.assert_close(ens(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ens.layers[2].running_mean[1, 0], members[1][2].running_mean)
    torch.testing.assert_close(ens.layers[5].running_var[2, 0], members[2][5].running_var)
    ens.eval(), [m.eval() for m in members]  # running statistics
    want = torch.stack([m(x) for m in members])
    torch.testing.assert_close(ens(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ens(x.expand(3, -1, -1)), want, atol=1e-6, rtol=1e-5)


def test_vectorized_training_equals_separate_members():
    features, labels = _toy()
    labels[::17] = 255  # ignore pixels are never trained on
    kw = dict(num_classes=4, num_members=3, batch_size=32, max_epochs=8, patience=4, min_epochs=2, seed=0,
              dtype=torch.float64)
    vec = fit_ensemble(features, labels, **kw)
    seq = fit_members_sequential(features, labels, **kw)
    steps = vec.layers[2].num_batches_tracked  # steps trained by each member
    assert torch.equal(steps, seq.layers[2].num_batches_tracked)
    assert len(set(steps.tolist())) > 1 and int(steps.max()) < 8 * 9  # stopped early, at different steps
    for key, value in vec.state_dict().items():
        torch.testing.assert_close(value, seq.state_dict()[key], atol=1e-5, rtol=0, msg=key)
    assert torch.equal(predict(vec, features)[0], predict(seq, features)[0])


@pytest.mark.parametrize("fit", [fit_ensemble, fit_members_sequential])
def test_stopping_rule_on_a_constant_loss(fit):
    # identical pixels and lr=0: every batch loss is the same, so only the first counted batch improves
    features, labels = torch.ones(40, 6), torch.full((40,), 2)
    ens = fit(features, labels, num_classes=3, num_members=2, batch_size=40, lr=0.0, max_epochs=50,
              patience=5, min_epochs=4)
    # 4 uncounted epochs, 1 improvement, then patience + 1 = 6 failures (one batch per epoch)
    assert ens.layers[2].num_batches_tracked.tolist() == [4 + 1 + 6] * 2


def test_stopped_member_stays_frozen():
    features, labels = _toy(seed=1)
    kw = dict(num_classes=4, num_members=4, batch_size=32, patience=3, min_epochs=1, seed=2)
    short = fit_ensemble(features, labels, max_epochs=4, **kw)
    longer = fit_ensemble(features, labels, max_epochs=9, **kw)
    steps = short.layers[2].num_batches_tracked
    stopped = (steps < 4 * 10).nonzero().flatten().tolist()  # 10 batches per epoch
    running = (longer.layers[2].num_batches_tracked > steps).nonzero().flatten().tolist()
    assert stopped and running, (steps, longer.layers[2].num_batches_tracked)
    for key, value in short.state_dict().items():
        assert torch.equal(value[stopped], longer.state_dict()[key][stopped]), key
        if value.dtype.is_floating_point:  # the others kept training
            assert not torch.equal(value[running], longer.state_dict()[key][running]), key


def test_vote_ties_go_to_the_lowest_class():
    big = 10.0
    one_hot = lambda k: [big if i == k else 0.0 for i in range(3)]
    features = torch.randn(6, 5)
    labels, _ = predict(_constant_members([one_hot(2), one_hot(1), one_hot(2), one_hot(1)]), features)
    assert labels.tolist() == [1] * 6
    labels, _ = predict(_constant_members([one_hot(0), one_hot(2), one_hot(2), one_hot(1)]), features)
    assert labels.tolist() == [2] * 6


def test_uncertainty_is_the_jensen_shannon_gap():
    features = torch.randn(4, 5)
    _, agree = predict(_constant_members([[20.0, 0.0]] * 3), features)
    assert float(agree.abs().max()) < 1e-6
    _, disagree = predict(_constant_members([[2.0, 0.0], [0.0, 2.0]]), features)
    s = 1 / (1 + math.exp(-2.0))
    h = -(s * math.log(s) + (1 - s) * math.log(1 - s))
    torch.testing.assert_close(disagree, torch.full((4,), math.log(2) - h), atol=1e-6, rtol=0)


def test_predict_image_layout_and_chunks():
    features, labels = _toy(p=2 * 6 * 5, d=8)
    ens = fit_ensemble(features, labels, num_classes=4, num_members=2, max_epochs=2)
    flat_labels, flat_unc = predict(ens, features)
    images = features.view(2, 6, 5, 8).permute(0, 3, 1, 2)  # (N, D, H, W)
    for chunk in (7, 30, 1000):
        lab, unc = predict(ens, images, chunk=chunk)
        assert lab.shape == (2, 6, 5) and lab.dtype == torch.int64
        assert torch.equal(lab.flatten(), flat_labels)
        torch.testing.assert_close(unc.flatten(), flat_unc)


def test_fit_learns_from_float16_store_features():
    features, labels = _toy(p=400, seed=3, signal=4.0)
    ens = fit_ensemble(features.half(), labels, num_classes=4, num_members=2, max_epochs=5)
    test_features, test_labels = _toy(p=400, seed=4, signal=4.0)
    assert (predict(ens, test_features)[0] == test_labels).float().mean() > 0.85


def test_drop_small_classes():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[0, :5] = 255
    labels[1, :] = 1
    labels[2:5, :] = 2  # 24 pixels
    labels[5, :3] = 3  # 3 pixels
    out = drop_small_classes(labels, num_classes=4, ignore_index=255, min_pixels=20)
    assert torch.equal(out == 255, (labels == 255) | (labels == 1) | (labels == 3))
    assert torch.equal(out[labels == 2], labels[labels == 2])


def _images(n: int, d: int = 4, hw: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features whose channels 0 and 1 hold the image and pixel index, so kept pixels can be traced."""
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(n):
        labels = torch.empty(hw, hw, dtype=torch.long)
        labels[:, : hw // 2], labels[:, hw // 2 :] = torch.randint(0, 3, (2,), generator=g)  # no class < 20 px
        labels[0] = 255
        feats = torch.randn(d, hw, hw, generator=g)
        feats[0], feats[1] = i, torch.arange(hw * hw).view(hw, hw)
        out.append((feats, labels))
    return out


def test_store_keeps_everything_when_it_fits():
    data = _images(5)
    store = PixelStore(4, num_classes=3, memory_mb=16)
    for feats, labels in data:
        store.add(feats, labels)
    want_f = torch.cat([f.flatten(1)[:, l.flatten() != 255].T for f, l in data])  # (P, D)
    want_l = torch.cat([l.flatten()[l.flatten() != 255] for _, l in data])
    got_f, got_l = store.tensors()
    assert len(store) == store.seen == 5 * 56
    assert got_f.dtype == torch.float16 and store._labels.dtype == torch.uint8
    assert torch.equal(got_f, want_f.half()) and torch.equal(got_l, want_l)


def test_store_is_bounded_and_uniform():
    data = _images(50, d=4, hw=8, seed=1)
    budget_mb = 0.01  # 10485 bytes // (2 * 4 + 1) bytes per pixel = 1165 pixels
    store = PixelStore(4, num_classes=3, memory_mb=budget_mb, seed=0)
    assert store.max_pixels == 1165
    for feats, labels in data:
        store.add(feats, labels)
        assert store.nbytes <= budget_mb * 2**20
    assert len(store) == 1165 and store.seen == 50 * 56
    feats, labels = store.tensors()
    image, pixel = feats[:, 0].long(), feats[:, 1].long()
    assert len(set(zip(image.tolist(), pixel.tolist()))) == 1165  # no pixel kept twice
    source = torch.stack([l.flatten() for _, l in data])  # (50, 64)
    assert torch.equal(labels, source[image, pixel])  # labels travel with their pixels
    # uniform over the stream: each image keeps about 1165 / 50 = 23.3 pixels, late images too
    counts = torch.bincount(image, minlength=50).float()
    assert counts[:25].sum() / counts.sum() == pytest.approx(0.5, abs=0.05)
    assert counts.min() > 8 and counts.max() < 40


def test_store_errors_and_label_dtype():
    assert PixelStore(4, num_classes=300, ignore_index=-1, max_pixels=10)._labels.dtype == torch.int16
    store = PixelStore(4, num_classes=3)
    with pytest.raises(DataError, match="label value 7 is outside"):
        store.add(torch.zeros(4, 2, 2), torch.full((2, 2), 7))
    with pytest.raises(DataError, match="only 0 labelled pixels"):
        fit_ensemble(torch.zeros(3, 4), torch.full((3,), 255), num_classes=3)


def test_save_load_round_trip(tmp_path):
    features, labels = _toy(p=200)
    ens = fit_ensemble(features, labels, num_classes=4, num_members=3, max_epochs=2)
    config = {"blocks": ["up_blocks.0"], "timesteps": [50, 150], "noise": "fixed", "seed": 0,
              "class_names": ["a", "b", "c", "d"], "feature_dim": 12}
    save_classifier(tmp_path / "clf", ens, config)
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier_config.json", "model.safetensors"]
    loaded, loaded_config = load_classifier(tmp_path / "clf")
    assert loaded_config == config and not loaded.training
    for a, b in zip(predict(ens, features), predict(loaded, features)):
        assert torch.equal(a, b)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"classifier folder .*nowhere does not exist"):
        load_classifier(tmp_path / "nowhere")
    folder = tmp_path / "clf"
    save_classifier(folder, PixelEnsemble(2, 6, 3), {"feature_dim": 6})
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"classifier file .*model\.safetensors is missing"):
        load_classifier(folder)
    save_classifier(folder, PixelEnsemble(2, 6, 3), {"feature_dim": 6})
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors are corrupt"):
        load_classifier(folder)
    save_classifier(folder, PixelEnsemble(2, 6, 3), {"feature_dim": 6})
    saved = json.loads((folder / "classifier_config.json").read_text())
    saved["architecture"]["in_features"] = 9
    (folder / "classifier_config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"model\.safetensors do not match .*size mismatch"):
        load_classifier(folder)
    (folder / "classifier_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"classifier_config\.json is corrupt"):
        load_classifier(folder)
    with pytest.raises(CheckpointError, match="not JSON"):
        save_classifier(folder, PixelEnsemble(2, 6, 3), {"dtype": torch.float32})


def test_store_preallocates_when_the_pixel_count_is_known():
    from diffseg_hf.pixel_classifier import PixelStore

    store = PixelStore(8, 3, max_pixels=300, expected_pixels=4 * 100, min_class_pixels=0)
    allocated = store.nbytes
    assert allocated == 300 * (8 * 2 + 1)  # capped at max_pixels, allocated up front
    for i in range(4):
        store.add(torch.randn(8, 10, 10), torch.randint(0, 3, (10, 10)))
        assert store.nbytes == allocated  # never grows (no grow-and-copy peak)
    assert len(store) == 300 and store.seen == 400
