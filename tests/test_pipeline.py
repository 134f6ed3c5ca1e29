"""The training generator against keras-retinanet's own, and its epoch/shard/border rules."""

import numpy as np
import pytest
from keras_retinanet.preprocessing.pascal_voc import PascalVocGenerator
from keras_retinanet.utils.anchors import anchor_targets_bbox, anchors_for_shape, guess_shapes
from keras_retinanet.utils.compute_overlap import compute_overlap
from keras_retinanet.utils.image import adjust_transform_for_image
from keras_retinanet.utils.transform import random_transform

from fgl_retinanet.config import VOC_CLASSES, load_config
from fgl_retinanet.data import TOY_CLASSES, VocDataset
from fgl_retinanet.pipeline import AnchorCache, AnchorSet, VocSequence, anchor_parameters


def _config(*overrides):
    return load_config(
        None, ["data.image_min_side=320", "data.image_max_side=512", *overrides]
    )


def reference_batch(generator, group, transforms):
    """keras-retinanet's compute_input_output for a group, each image with a given transform."""
    images = generator.load_image_group(group)
    annotations = generator.load_annotations_group(group)
    images, annotations = generator.filter_annotations(images, annotations, group)
    for index, transform in enumerate(transforms):
        if transform is not None:
            matrix = adjust_transform_for_image(transform.copy(), images[index], True)
            images[index], annotations[index] = generator.random_transform_group_entry(
                images[index], annotations[index], matrix
            )
    images, annotations = generator.preprocess_group(images, annotations)
    return generator.compute_inputs(images), generator.compute_targets(images, annotations)


TRANSFORMS = {
    "none": None,
    "flip": random_transform(flip_x_chance=1.0),
    "identity": random_transform(),
    # Not a flip: keras-retinanet's own warpAffine path.
    "rotation": random_transform(min_rotation=0.1, max_rotation=0.1, min_scaling=(1.1, 1.1),
                                 max_scaling=(1.1, 1.1)),
}  # fmt: skip


@pytest.mark.parametrize(
    "transform, sides",
    [("none", (320, 512)), ("flip", (320, 512)), ("identity", (320, 512)),
     ("rotation", (320, 512)), ("flip", (800, 1333))],
)  # fmt: skip
def test_targets_match_keras_retinanet(voc_sample, transform, sides):
    # Same image, same transform: inputs and both target tensors must be identical.
    theirs = PascalVocGenerator(
        str(voc_sample), "trainval", batch_size=1, group_method="none", shuffle_groups=False,
        image_min_side=sides[0], image_max_side=sides[1],
    )  # fmt: skip
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    config = load_config(
        None, [f"data.image_min_side={sides[0]}", f"data.image_max_side={sides[1]}"]
    )
    ours = VocSequence(dataset, config, training=False)
    matrix = TRANSFORMS[transform]
    assert dataset.report.objects == 41
    for index in range(len(dataset)):
        expected = reference_batch(theirs, [index], [matrix])
        inputs, targets = ours.build_batch([index], [None if matrix is None else matrix.copy()])
        np.testing.assert_array_equal(inputs, expected[0])
        np.testing.assert_array_equal(targets[0], expected[1][0])
        np.testing.assert_array_equal(targets[1], expected[1][1])
        # Every image of the sample has objects, so some anchors must be positive.
        assert (targets[1][0, :, -1] == 1).sum() > 0


def test_a_flip_changes_the_targets(voc_sample):
    # Guards the comparison above: the flipped batch really differs from the plain one.
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    ours = VocSequence(dataset, _config(), training=False)
    plain_inputs, plain = ours.build_batch([0], [None])
    flipped_inputs, flipped = ours.build_batch([0], [TRANSFORMS["flip"].copy()])
    assert not np.array_equal(plain_inputs, flipped_inputs)
    assert not np.array_equal(plain[1], flipped[1])
    # The flip is warpAffine's: output column x is input column width - x (the last column
    # repeated at x = 0), and boxes move the same way.
    image = ours.load_image(0)
    annotations = ours.load_annotations(0)
    width = image.shape[1]
    mirrored, moved = ours.transform_entry(image, dict(annotations), TRANSFORMS["flip"].copy())
    np.testing.assert_array_equal(mirrored[:, 1:], image[:, :0:-1])
    np.testing.assert_array_equal(mirrored[:, 0], image[:, -1])
    flipped_x = width - annotations["bboxes"][:, [0, 2]]
    np.testing.assert_array_equal(moved["bboxes"][:, [2, 0]], flipped_x)


def test_padded_batch_matches_keras_retinanet(voc_sample):
    # Two images of different shapes in one batch: padding and outside-anchor rules.
    theirs = PascalVocGenerator(
        str(voc_sample), "trainval", batch_size=2, group_method="none", shuffle_groups=False,
        image_min_side=320, image_max_side=512,
    )  # fmt: skip
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    ours = VocSequence(dataset, _config("train.batch_size=2"), training=False)
    group = [0, 1]
    assert dataset.records[0].width != dataset.records[1].width
    expected = reference_batch(theirs, group, [None, TRANSFORMS["flip"]])
    inputs, targets = ours.build_batch(group, [None, TRANSFORMS["flip"].copy()])
    np.testing.assert_array_equal(inputs, expected[0])
    np.testing.assert_array_equal(targets[0], expected[1][0])
    np.testing.assert_array_equal(targets[1], expected[1][1])
    assert (targets[1][:, :, -1] == -1).sum() > 0


@pytest.mark.parametrize("shape", [(320, 427, 3), (800, 1066, 3), (1333, 750, 3), (41, 97, 3)])
def test_anchor_sets_equal_keras_retinanet_anchors(shape):
    params = anchor_parameters([32, 64, 128, 256, 512])
    np.testing.assert_array_equal(
        AnchorSet(shape, params).anchors(),
        anchors_for_shape(shape, anchor_params=params, shapes_callback=guess_shapes),
    )


def test_overlaps_equal_compute_overlap():
    # Random boxes, boxes past the border, duplicates (ties) and a degenerate box.
    anchors = AnchorSet((320, 480, 3), anchor_parameters([32, 64, 128, 256, 512]))
    rng = np.random.default_rng(0)
    corners = rng.uniform(-40, 500, size=(12, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 300, size=(12, 2))], axis=1)
    boxes = np.concatenate([boxes, boxes[:2], [[10.0, 10.0, 10.5, 10.5]]])
    best, nearest = anchors.overlaps(boxes)
    expected = compute_overlap(anchors.anchors(), boxes)
    np.testing.assert_array_equal(nearest, expected.argmax(axis=1))
    np.testing.assert_array_equal(best, expected.max(axis=1))
    assert (best >= 0.5).sum() > 10 and not (nearest == 12).any()


def test_difficult_ignore_matches_the_reference_rule(voc_sample):
    # The fast targets against keras-retinanet's targets plus the rule applied the slow way.
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    ours = VocSequence(dataset, _config("data.difficult=ignore"), training=False)
    hard = [i for i, r in enumerate(dataset.records) if r.difficult.any()]
    assert hard
    for index in hard:
        image = ours.load_image(index)
        annotations = ours.load_annotations(index)
        image, scale = ours.resize_image(image)
        for key in ("bboxes", "ignore_bboxes"):
            annotations[key] = annotations[key] * scale
        fast = ours.compute_targets([image], [annotations])
        slow = ours._anchor_targets(
            ours.generate_anchors(image.shape), [image], [annotations], ours.num_classes()
        )
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])


def test_anchor_cache_is_bounded():
    cache = AnchorCache(anchor_parameters([32, 64, 128, 256, 512]), size=2)
    first = cache.get((320, 480, 3))
    # Shapes with the same feature maps share one set.
    assert cache.get((318, 475, 3)) is first
    cache.get((480, 320, 3))
    cache.get((200, 200, 3))
    assert len(cache.sets) == 2
    assert cache.get((320, 480, 3)) is not first


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


def _flips(sequence, epoch, steps=None):
    # One character per image slot of the epoch: F for a horizontal flip, . for none, - for
    # no transform at all.
    steps = range(len(sequence)) if steps is None else steps
    return "".join(
        "-" if transform is None else "F" if transform[0, 0] < 0 else "."
        for step in steps
        for transform in sequence.batch_transforms(step, epoch)
    )


def test_augmentation_is_a_function_of_the_image_slot(toy_root):
    # What resuming relies on: epoch 1's transforms do not depend on epoch 0 having run here.
    import concurrent.futures

    dataset = VocDataset(toy_root, "train", TOY_CLASSES)
    config = _config("train.batch_size=5", "train.seed=7", "data.flip_chance=0.5")
    uninterrupted = VocSequence(dataset, config, training=True)
    epoch0 = _flips(uninterrupted, 0)
    epoch1 = _flips(uninterrupted, 1)
    resumed = VocSequence(dataset, config, training=True)
    assert _flips(resumed, 1) == epoch1
    # Asked in reverse order, as loader threads may, each slot still gets its own transform.
    reverse = range(len(resumed) - 1, -1, -1)
    assert _flips(resumed, 1, reverse) == "".join(
        _flips(uninterrupted, 1, [step]) for step in reverse
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        built = pool.map(lambda step: _flips(resumed, 0, [step]), range(len(resumed)))
        assert "".join(built) == epoch0
    # Slots differ between epochs and ranks, and about half of them flip.
    assert len(epoch0) == 24 and epoch0 != epoch1
    assert 6 <= epoch0.count("F") <= 18 and 6 <= epoch1.count("F") <= 18
    rank1 = VocSequence(dataset, config, training=True, rank=1, world=2)
    assert _flips(rank1, 0) != epoch0[:12]
    # The batch the keras Sequence returns uses the same transforms.
    resumed.set_epoch(1)
    first = resumed.groups[0]
    expected = resumed.build_batch(first, resumed.batch_transforms(0, 1))
    np.testing.assert_array_equal(resumed[0][0], expected[0])
    # Evaluation and flip_chance 0 draw nothing.
    assert _flips(VocSequence(dataset, config, training=False), 0) == "-" * 24
    no_flips = VocSequence(dataset, _config("data.flip_chance=0"), training=True)
    assert _flips(no_flips, 0) == "-" * 24


def test_a_transform_generator_is_read_in_slot_order(toy_root):
    from keras_retinanet.utils.transform import random_transform_generator

    dataset = VocDataset(toy_root, "train", TOY_CLASSES)
    config = _config("train.batch_size=5", "data.flip_chance=0")

    def stream():
        return random_transform_generator(prng=np.random.RandomState(3), flip_x_chance=0.5)

    reference = stream()
    draws = [next(reference) for _ in range(48)]
    # A fresh sequence starting at epoch 1 skips epoch 0's 24 draws, whatever the ask order.
    resumed = VocSequence(dataset, config, training=True, transform_generator=stream())
    resumed.set_epoch(1)
    for position in (3, 0, 23, 1):
        np.testing.assert_array_equal(resumed.transform_at(1, position), draws[24 + position])
    # A slot already served cannot be served again: the stream has moved on.
    with pytest.raises(RuntimeError, match="already used"):
        resumed.transform_at(1, 3)
    with pytest.raises(RuntimeError, match="already used"):
        resumed.transform_at(0, 5)


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


def test_image_without_objects_trains_and_evaluates(voc_sample, tmp_path):
    import shutil

    import tensorflow as tf
    from keras_retinanet.losses import smooth_l1

    from fgl_retinanet.evaluation import average_precisions
    from fgl_retinanet.losses import build_loss

    # A VOC tree with one annotated image and one without any object.
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    for image_id in ("000001", "000002"):
        shutil.copy(voc_sample / "JPEGImages" / f"{image_id}.jpg", tmp_path / "JPEGImages")
    shutil.copy(voc_sample / "Annotations" / "000001.xml", tmp_path / "Annotations")
    (tmp_path / "Annotations" / "000002.xml").write_text(
        "<annotation><size><width>335</width><height>500</height><depth>3</depth></size>"
        "</annotation>"
    )
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    dataset = VocDataset(tmp_path, "train", VOC_CLASSES)
    assert [len(r.boxes) for r in dataset.records] == [2, 0]

    # Targets: no positive and no ignored anchor except those centred outside the image, as
    # keras-retinanet computes them for an empty annotation.
    ours = VocSequence(dataset, _config(), training=False)
    inputs, (regression, labels) = ours.build_batch([1], [TRANSFORMS["flip"].copy()])
    image = np.zeros(inputs.shape[1:])
    empty = {"bboxes": np.zeros((0, 4)), "labels": np.zeros((0,))}
    expected = anchor_targets_bbox(
        ours.generate_anchors(image.shape), [image], [empty], len(VOC_CLASSES)
    )
    np.testing.assert_array_equal(regression, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    assert (labels[0, :, -1] == 1).sum() == 0 and labels[0, :, :-1].sum() == 0
    assert (labels[0, :, -1] == 0).sum() > 0.9 * labels.shape[1]

    # Both losses are finite on it: the focal normaliser is at least 1.
    logits = tf.random.stateless_normal((1, labels.shape[1], len(VOC_CLASSES)), seed=(1, 2))
    for name in ("focal", "focal_gradient"):
        value = float(build_loss(name)(labels, logits))
        assert np.isfinite(value) and value > 0
    box_loss = float(smooth_l1()(regression, tf.zeros((1, labels.shape[1], 4))))
    assert np.isfinite(box_loss) and box_loss == 0.0

    # Evaluation: a detection on the empty image is a false positive.
    ground_truth = dataset.ground_truth()
    assert ground_truth["000002"] == []
    dog = ground_truth["000001"][0]["box"]
    hit = {"box": dog, "score": 0.5, "label": "dog"}
    alone = average_precisions(ground_truth, {"000001": [hit]}, ["dog"])
    with_empty = average_precisions(
        ground_truth,
        {"000001": [hit], "000002": [{"box": dog, "score": 0.9, "label": "dog"}]},
        ["dog"],
    )
    assert alone["per_class"]["dog"] == pytest.approx(1.0)
    assert with_empty["per_class"]["dog"] == pytest.approx(0.5)


def test_training_boxes_are_the_evaluation_ground_truth(voc_sample):
    # One 1-based to 0-based shift, shared: the generator's boxes are the evaluation's boxes.
    dataset = VocDataset(voc_sample, "trainval", VOC_CLASSES)
    ours = VocSequence(dataset, _config(), training=False)
    ground_truth = dataset.ground_truth()
    for index, record in enumerate(dataset.records):
        annotations = ours.load_annotations(index)
        expected = [entry["box"] for entry in ground_truth[record.image_id]]
        np.testing.assert_array_equal(annotations["bboxes"], np.array(expected).reshape(-1, 4))
        assert [VOC_CLASSES[int(label)] for label in annotations["labels"]] == [
            entry["label"] for entry in ground_truth[record.image_id]
        ]
    # 000001's dog is <xmin>48 ... in the XML.
    assert ground_truth["000001"][0]["box"] == [47.0, 239.0, 194.0, 370.0]
