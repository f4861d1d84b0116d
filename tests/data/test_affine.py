"""data/affine.py, the robustness split's transforms, on real MNIST test digits: the identity is
the image bit for bit, each family does what its magnitude says, the digit stays in the frame,
labels never change, the same seed gives the same bytes, and a malformed configuration is
refused before any work."""

import numpy as np
import pytest

from data import affine

# The first 100 official test digits: every family is checked on real strokes, not a toy.
N = 100


@pytest.fixture(scope="module")
def digits(mnist_arrays):
    return mnist_arrays.x_test[:N], mnist_arrays.y_test[:N].astype(int)


def correlation(a, b):
    return np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1]


def centroid(image):
    ys, xs = np.mgrid[:image.shape[0], :image.shape[1]]
    mass = image.astype(float).sum()
    return np.array([(ys * image).sum() / mass, (xs * image).sum() / mass])


def test_identity_is_the_image_bit_for_bit(digits):
    for image, label in zip(*digits):
        out = affine.transform_example(image, label, "identity", 0, seed=0)
        assert out.image.dtype == np.uint8 and np.array_equal(out.image, image)
        assert out.tries == 1
    assert np.array_equal(affine.warp(digits[0][0], np.eye(2)), digits[0][0])


@pytest.mark.parametrize("degrees", [10, 20, 30, 45])
def test_rotating_by_theta_then_minus_theta_comes_back_within_interpolation(digits, degrees):
    """Bilinear resampling averages each pixel with its neighbours, twice here: it blurs strokes
    (2-3 px wide) by about half a pixel, which moves a fifth to two fifths of the ink to the
    neighbouring pixels (measured: 23 % on average, at most 43 % of the ink, at any angle) but
    keeps the shape in place. So the bound is on shape and position, not on pixel values: the
    correlation with the original >= 0.94 and the ink's centroid within 0.3 px, for every one
    of the 100 digits. The same two rotations in the same direction are far off (the check can
    fail)."""
    for image in digits[0]:
        back = affine.warp(affine.warp(image, affine.rotation(degrees)), affine.rotation(-degrees))
        assert correlation(back, image) >= 0.94
        assert np.abs(centroid(back) - centroid(image)).max() <= 0.3
    twice = [correlation(affine.warp(affine.warp(i, affine.rotation(degrees)),
                                     affine.rotation(degrees)), i) for i in digits[0]]
    assert np.median(twice) < 0.9


def test_rotation_turns_counter_clockwise_on_screen():
    image = np.zeros((28, 28), np.uint8)
    image[13:15, 20:24] = 255  # a bar right of the centre
    turned = affine.warp(image, affine.rotation(90))
    y, x = centroid(turned)
    assert abs(x - 13.5) < 0.5 and y < 9  # now above the centre


def test_translation_is_an_exact_integer_shift_on_the_ring_of_its_magnitude(digits):
    for image, label in zip(*digits):
        for m in (3, 4, 5):
            out = affine.transform_example(image, label, "translate", m, seed=0)
            if out.image is None:
                continue
            found = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)
                     if np.array_equal(np.roll(image, (dy, dx), axis=(0, 1)), out.image)]
            assert found and max(abs(found[0][0]), abs(found[0][1])) == m
            assert out.image.sum(dtype=int) == image.sum(dtype=int)  # nothing cut off


def test_scale_and_shear_change_the_ink_as_their_magnitude_says(digits):
    image, label = digits[0][0], digits[1][0]

    def extent(img):  # rows and columns that hold ink
        rows, cols = np.nonzero(img.sum(1))[0], np.nonzero(img.sum(0))[0]
        return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1

    small = affine.transform_example(image, label, "scale", 80, seed=0).image
    assert all(s < o for s, o in zip(extent(small), extent(image)))
    sheared = affine.transform_example(image, label, "shear", 40, seed=0).image
    assert extent(sheared)[0] == extent(image)[0]  # a horizontal shear keeps the rows


def test_every_kept_digit_lies_inside_the_frame_and_what_leaves_it_is_refused(digits):
    """A kept image is the full transform: drawn again with the frame's margin, none of its ink
    falls outside (`fits`); a transform that pushes ink out is not used."""
    spec = affine.AffineSpec()
    for image, label in zip(*[d[:20] for d in digits]):
        for family, magnitude, out in affine.transform_all(image, label, spec):
            if out.image is not None:
                assert affine.fits(affine.warp(out.image, np.eye(2), margin=affine.MARGIN))
    pushed_out = affine.warp(digits[0][0], np.eye(2), offset=(12.0, 0.0), margin=affine.MARGIN)
    assert not affine.fits(pushed_out)


def test_a_digit_no_candidate_keeps_in_the_frame_is_rejected_and_counted():
    wide = np.zeros((28, 28), np.uint8)
    wide[2:26, 1:27] = 200  # fills the frame: no shift of 5 px keeps it inside
    out = affine.transform_example(wide, 3, "translate", 5, seed=0)
    assert out.image is None and out.tries == 40  # every shift of the ring was tried
    counts = affine.counts_by_transform([("translate", 5, out)])
    assert counts == {("translate", 5): {"kept": 0, "resampled": 0, "rejected": 1}}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(digits):
    spec = affine.AffineSpec()
    def outputs(image, label, spec):
        return [None if o.image is None else o.image.tobytes()
                for _, _, o in affine.transform_all(image, label, spec)]

    image, label = digits[0][7], digits[1][7]
    first = outputs(image, label, spec)
    assert first == outputs(image.copy(), label, spec)
    other = outputs(image, label, affine.AffineSpec(seed=1))
    assert first[0] == other[0] and first != other  # the identity has nothing to draw


def test_each_example_draws_from_its_own_seed_whatever_came_before(digits):
    """Order independence: an example's transform is a function of itself, the family, the
    magnitude and the split's seed, so Beam may process examples in any order."""
    image, label = digits[0][3], digits[1][3]
    alone = affine.transform_example(image, label, "affine", 0, seed=0).image
    for other, other_label in zip(*digits):
        affine.transform_example(other, other_label, "affine", 0, seed=0)
    assert np.array_equal(affine.transform_example(image, label, "affine", 0, seed=0).image,
                          alone)


def test_the_spec_lists_every_transform_once_and_round_trips():
    spec = affine.AffineSpec()
    pairs = spec.transforms()
    assert pairs[0] == ("identity", 0) and pairs[-1] == ("affine", 0)
    assert len(pairs) == len(set(pairs)) == 15
    assert affine.AffineSpec.from_json_dict(spec.to_json_dict()) == spec
    assert affine.AffineSpec(mix=False).transforms()[-1] == ("shear", 40)


@pytest.mark.parametrize("bad, message", [
    (dict(rotate=(10, 200)), r"rotate magnitudes must be in \[1, 180\] degrees, got \[200\]"),
    (dict(translate=(3, 3)), "translate magnitudes must not repeat"),
    (dict(scale=(100,)), "scale magnitude 100 is the identity"),
    (dict(shear=(0.2,)), r"shear magnitudes must be a tuple of ints \(hundredths\)"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(images=0), "images must be None"),
])
def test_a_malformed_configuration_is_refused_naming_the_field(bad, message):
    with pytest.raises(affine.AffineConfigError, match=message):
        affine.AffineSpec(**bad)


def test_unknown_settings_are_refused():
    with pytest.raises(affine.AffineConfigError, match=r"unknown robustness split settings "
                                                        r"\['rotation'\]"):
        affine.AffineSpec.from_json_dict({"rotation": [10]})
