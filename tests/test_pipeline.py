"""The training generator against keras-retinanet's own, and its epoch/shard/border rules."""

import numpy as np
import pytest
from keras_retinanet.preprocessing.pascal_voc import PascalVocGenerator
from keras_retinanet.utils.transform import random_transform

from fgl_retinanet.config import VOC_CLASSES, load_config
from fgl_retinanet.data import TOY_CLASSES, VocDataset
from fgl_retinanet.pipeline import VocSequence


def _config(*overrides):
    return load_config(
        None, ["data.image_min_side=320", "data.image_max_side=512", *overrides]
    )


@pytest.mark.parametrize("flip", [False, True])
def test_targets_match_keras_retinanet(voc_sample, flip):
    # Same image, same transform: inputs and both target tensors must be identical.
    theirs = PascalVocGenerator(
        str(voc_sample), "trainval", batch_size=1, group_method="none", shuffle_groups=False,
        image_min_side=320, image_max_side=512,
    )  # fmt: skip
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    ours = VocSequence(dataset, _config("data.flip_chance=0"), training=False)
    transform = random_transform(flip_x_chance=1.0) if flip else None
    assert dataset.report.objects == 41
    for index in range(len(dataset)):
        if flip:
            from keras_retinanet.utils.image import adjust_transform_for_image

            images = theirs.load_image_group([index])
            annotations = theirs.load_annotations_group([index])
            images, annotations = theirs.filter_annotations(images, annotations, [index])
            matrix = adjust_transform_for_image(transform, images[0], True)
            images[0], annotations[0] = theirs.random_transform_group_entry(
                images[0], annotations[0], matrix
            )
            images, annotations = theirs.preprocess_group(images, annotations)
            expected = (theirs.compute_inputs(images), theirs.compute_targets(images, annotations))
        else:
            expected = theirs.compute_input_output([index])
        inputs, targets = ours.build_batch([index], [transform])
        np.testing.assert_array_equal(inputs, expected[0])
        np.testing.assert_array_equal(targets[0], expected[1][0])
        np.testing.assert_array_equal(targets[1], expected[1][1])
        # Every image of the sample has objects, so some anchors must be positive.
        assert (targets[1][0, :, -1] == 1).sum() > 0


def test_epoch_order_is_deterministic_and_shards_are_disjoint(toy_root):
    dataset = VocDataset(toy_root, "train", TOY_CLASSES)
    config = _config("train.batch_size=5", "train.seed=7")
    single = VocSequence(dataset, config, training=True)
    ranks = [VocSequence(dataset, config, training=True, rank=r, world=2) for r in (0, 1)]
    seen_orders = []
    for epoch in (0, 1):
        for sequence in [single, *ranks]:
            sequence.set_epoch(epoch)
        order = [i for group in single.groups for i in group]
        # One pass: every image exactly once, a short last batch instead of repeats.
        assert sorted(order) == list(range(24))
        assert [len(g) for g in single.groups] == [5, 5, 5, 5, 4]
        # Two ranks split the same permutation: disjoint, together complete, equal steps.
        shard0 = [i for group in ranks[0].groups for i in group]
        shard1 = [i for group in ranks[1].groups for i in group]
        assert set(shard0).isdisjoint(shard1) and sorted(shard0 + shard1) == list(range(24))
        assert len(ranks[0]) == len(ranks[1])
        seen_orders.append(order)
    assert seen_orders[0] != seen_orders[1]
    # A fresh generator at the same epoch reproduces the order (what resuming relies on).
    again = VocSequence(dataset, config, training=True)
    again.set_epoch(1)
    assert [i for g in again.groups for i in g] == seen_orders[1]


def test_boxes_on_the_border_reach_the_targets(toy_root):
    # keras-retinanet's filter drops boxes touching the border; ours keeps every object.
    dataset = VocDataset(toy_root, "train", TOY_CLASSES)
    sequence = VocSequence(dataset, _config("data.flip_chance=0"), training=False)
    index = next(i for i, r in enumerate(dataset.records) if (r.boxes[:, 2] == 127).any())
    annotations = sequence.load_annotations(index)
    image = sequence.load_image(index)
    _, (kept,) = sequence.filter_annotations([image], [annotations], [index])
    np.testing.assert_array_equal(kept["bboxes"], dataset.records[index].boxes)


def test_undecodable_image_during_training_is_blank_and_named(toy_root, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(toy_root, root)
    dataset = VocDataset(root, "train", TOY_CLASSES)
    # The header check passed at start-up; the file breaks afterwards.
    path = dataset.records[2].image_path
    path.write_bytes(path.read_bytes()[:200])
    sequence = VocSequence(dataset, _config("data.flip_chance=0"), training=False)
    inputs, (regression, labels) = sequence.build_batch([2, 3], [None, None])
    assert inputs.shape[0] == 2
    assert (labels[0, :, -1] == 1).sum() == 0 and (labels[1, :, -1] == 1).sum() > 0
    assert sequence.unreadable_images == {2}
    assert str(path) in caplog.text


def test_difficult_ignore_turns_background_anchors_into_ignore(voc_sample):
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    index = next(i for i, r in enumerate(dataset.records) if r.difficult.any())
    include = VocSequence(dataset, _config("data.flip_chance=0"), training=False)
    ignore = VocSequence(
        dataset, _config("data.flip_chance=0", "data.difficult=ignore"), training=False
    )
    _, (_, labels_include) = include.build_batch([index], [None])
    _, (_, labels_ignore) = ignore.build_batch([index], [None])
    state_include = labels_include[0, :, -1]
    state_ignore = labels_ignore[0, :, -1]
    # Fewer positives (difficult boxes are no longer targets), and no anchor near a difficult
    # object has become background: the anchors that changed became ignore, not 0.
    assert (state_ignore == 1).sum() < (state_include == 1).sum()
    changed = state_ignore != state_include
    assert changed.any()
    assert set(np.unique(state_ignore[changed])) <= {-1.0}
