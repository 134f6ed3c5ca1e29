"""Tests for fgl_retinanet.analysis: the effective FGL objective, the residual, fgl-plot."""

import csv
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import integrate

from fgl_retinanet import analysis, cli, losses
from fgl_retinanet.analysis import (
    effective_focal_gradient_loss,
    focal_gradient_loss_derivative,
    focal_gradient_residual,
    focal_loss_derivative,
    focal_loss_value,
)

ISSUE_GAMMAS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0]

# From 1e-8 to just below 1, both sides of every series switch point (1/2, 1/3, 1/6, ...).
PROBABILITIES = np.unique(
    np.concatenate(
        [
            np.logspace(-8, -1e-3, 40),
            1.0 - np.logspace(-9, -0.4, 30),
            [1 / 21, 1 / 6, 1 / 3.5, 1 / 3, 0.4999999, 0.5, 0.5000001, 0.95],
        ]
    )
)


def _quadrature(p: float, gamma: float) -> float:
    """integral_p^1 (1 - z)**gamma / z dz by adaptive quadrature, accurate near both ends."""
    q = 1.0 - p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        if q < 0.5:
            # u = 1 - z with the algebraic weight u**gamma: no cancellation as L -> 0.
            value, _ = integrate.quad(
                lambda u: 1.0 / (1.0 - u), 0.0, q, weight="alg", wvar=(gamma, 0.0),
                epsabs=0.0, epsrel=1e-13, limit=500,
            )  # fmt: skip
        else:
            value, _ = integrate.quad(
                lambda z: (1.0 - z) ** gamma / z, p, 1.0, epsabs=0.0, epsrel=1e-13, limit=500
            )
    return value


@pytest.mark.parametrize("gamma", ISSUE_GAMMAS + [7.3, 20.0])
def test_effective_objective_matches_quadrature(gamma):
    values = effective_focal_gradient_loss(PROBABILITIES, gamma)
    reference = np.array([_quadrature(p, gamma) for p in PROBABILITIES])
    assert values.shape == PROBABILITIES.shape
    assert np.all(reference > 0)
    np.testing.assert_allclose(values, reference, rtol=1e-8, atol=0)


def test_gamma_zero_is_cross_entropy_and_the_objective_vanishes_at_one():
    np.testing.assert_allclose(
        effective_focal_gradient_loss(PROBABILITIES, 0.0), -np.log(PROBABILITIES), rtol=1e-15
    )
    for gamma in ISSUE_GAMMAS:
        assert effective_focal_gradient_loss(1.0, gamma) == 0.0
        assert focal_gradient_residual(1.0, gamma) == 0.0


def test_values_of_the_posts_plot():
    # L(0.005) as read off the post's figure.
    assert effective_focal_gradient_loss(0.005, 1.0) == pytest.approx(4.30, abs=0.005)
    assert effective_focal_gradient_loss(0.005, 2.0) == pytest.approx(3.81, abs=0.005)
    # The closed forms with the harmonic constant: -log p - (1 - p) and -log p + 2p - p^2/2 - 3/2.
    p = np.array([0.005, 0.2, 0.45])
    np.testing.assert_allclose(
        effective_focal_gradient_loss(p, 1.0), -np.log(p) - (1 - p), rtol=1e-14
    )
    np.testing.assert_allclose(
        effective_focal_gradient_loss(p, 2.0), -np.log(p) + 2 * p - p**2 / 2 - 1.5, rtol=1e-14
    )


def test_posts_printed_closed_form_misses_the_harmonic_number():
    # The post's -log p - sum binom(g, i) (-p)^i / i is H_gamma above the objective everywhere.
    p = np.linspace(0.01, 1.0, 50)
    printed = -np.log(p) + 2 * p - p**2 / 2
    np.testing.assert_allclose(printed - effective_focal_gradient_loss(p, 2.0), 1.5, rtol=1e-12)


@pytest.mark.parametrize("gamma", ISSUE_GAMMAS + [0.3, 7.3])
def test_effective_objective_never_exceeds_focal_loss(gamma):
    p = np.concatenate([np.logspace(-10, 0, 2000), 1.0 - np.logspace(-12, -1, 200)])
    gap = focal_loss_value(p, gamma) - effective_focal_gradient_loss(p, gamma)
    # Rounding may leave the gap a few ulps below 0 where both vanish together at p -> 1.
    assert np.all(gap >= -1e-15 * np.abs(focal_loss_value(p, gamma)))
    if gamma > 0:
        # Strictly below inside the interval, since R < 0 there.
        assert np.all(gap[(p > 1e-6) & (p < 0.99)] > 0)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_derivative_of_the_objective_is_fgls_gradient(gamma):
    # Central differences of L against -(1 - p)^gamma / p.
    p = np.linspace(0.02, 0.98, 49)
    h = 1e-6
    numeric = (
        effective_focal_gradient_loss(p + h, gamma) - effective_focal_gradient_loss(p - h, gamma)
    ) / (2 * h)
    np.testing.assert_allclose(numeric, focal_gradient_loss_derivative(p, gamma), rtol=1e-6)


def test_residual_is_minus_gamma_times_the_lower_focal_loss():
    p = np.linspace(0.01, 0.99, 99)
    for gamma in (1.0, 2.0, 2.5, 5.0):
        np.testing.assert_allclose(
            focal_gradient_residual(p, gamma), -gamma * focal_loss_value(p, gamma - 1), rtol=1e-13
        )
        assert np.all(focal_gradient_residual(p, gamma) < 0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_derivative_splits_into_fgl_and_residual_as_tensorflow_differentiates(gamma):
    tf = pytest.importorskip("tensorflow")
    p = np.concatenate([np.linspace(0.01, 0.99, 99), [0.05, 0.001, 0.999]])
    variable = tf.Variable(p, dtype=tf.float64)

    # FL and FGL written plainly in float64 TensorFlow, FGL with the stopped weight.
    with tf.GradientTape(persistent=True) as tape:
        weight = tf.pow(1.0 - variable, gamma)
        focal = -weight * tf.math.log(variable)
        focal_gradient = -tf.stop_gradient(weight) * tf.math.log(variable)
    fl_autodiff = tape.gradient(focal, variable).numpy()
    fgl_autodiff = tape.gradient(focal_gradient, variable).numpy()
    np.testing.assert_allclose(fgl_autodiff, focal_gradient_loss_derivative(p, gamma), rtol=1e-12)
    np.testing.assert_allclose(
        fl_autodiff,
        focal_gradient_loss_derivative(p, gamma) + focal_gradient_residual(p, gamma),
        rtol=1e-12,
    )
    np.testing.assert_allclose(fl_autodiff - fgl_autodiff, focal_gradient_residual(p, gamma),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_the_training_losses_have_these_derivatives(gamma):
    # The package's FocalLoss and FocalGradientLoss on one positive element with alpha 1:
    # dL/dz = dL/dp * p (1 - p), so dividing the logit gradient by p (1 - p) gives dL/dp.
    tf = pytest.importorskip("tensorflow")
    p = np.array([0.01, 0.05, 0.2, 0.5, 0.8, 0.95])
    logits = tf.constant(np.log(p / (1 - p))[:, None, None], tf.float32)  # (batch, 1, 1)
    y_true = tf.constant(np.tile([[[1.0, 1.0]]], (p.size, 1, 1)), tf.float32)
    for loss_class, expected in (
        (losses.FocalLoss, focal_loss_derivative(p, gamma)),
        (losses.FocalGradientLoss, focal_gradient_loss_derivative(p, gamma)),
    ):
        loss = loss_class(alpha=1.0, gamma=gamma)
        for index in range(p.size):
            z = tf.Variable(logits[index : index + 1])
            with tf.GradientTape() as tape:
                value = loss(y_true[index : index + 1], z)
            gradient = float(tape.gradient(value, z).numpy().ravel()[0])
            dl_dp = gradient / (p[index] * (1 - p[index]))
            assert dl_dp == pytest.approx(expected[index], rel=2e-4)


def test_losses_module_reexports_the_analysis_functions():
    assert losses.effective_focal_gradient_loss is effective_focal_gradient_loss
    assert losses.focal_gradient_residual is focal_gradient_residual


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, np.nan])
def test_probabilities_outside_the_interval_are_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        effective_focal_gradient_loss(np.array([0.5, bad]), 2.0)


def test_negative_gamma_is_refused():
    with pytest.raises(ValueError, match="gamma"):
        effective_focal_gradient_loss(0.5, -1.0)


def _read_csv(path):
    with open(path) as f:
        return {key: np.array(values, dtype=float)
                for key, values in zip(*_columns(list(csv.reader(f))))}  # fmt: skip


def _columns(rows):
    header, body = rows[0], rows[1:]
    return header, list(zip(*body))


def test_plot_command_writes_the_posts_figures_and_values(tmp_path, capsys):
    out = tmp_path / "figures"
    assert cli.plot_main(["losses", "--gamma", "1", "2", "--out", str(out)]) == 0
    for name in ("objectives.png", "gradients.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    objectives = _read_csv(out / "objectives.csv")
    gradients = _read_csv(out / "gradients.csv")
    assert set(objectives) == {"p", "ce", "fl_gamma_1", "fgl_gamma_1", "fl_gamma_2", "fgl_gamma_2"}
    assert objectives["p"][0] == 0.005 and objectives["p"][-1] == 1.0

    # The post's numbers: L(0.005) and, at p = 0.05 with gamma 2, FL' = FGL' + R.
    assert objectives["fgl_gamma_1"][0] == pytest.approx(4.30, abs=0.005)
    assert objectives["fgl_gamma_2"][0] == pytest.approx(3.81, abs=0.005)
    (row,) = np.nonzero(gradients["p"] == 0.05)[0]
    assert gradients["fl_grad_gamma_2"][row] == pytest.approx(-23.74, abs=0.005)
    assert gradients["fgl_grad_gamma_2"][row] == pytest.approx(-18.05, abs=1e-9)
    assert gradients["residual_abs_gamma_2"][row] == pytest.approx(5.69, abs=0.005)
    assert gradients["ce_grad"][row] == pytest.approx(-20.0)
    assert "| 2 | 2.7036 | 1.5945 | -23.74 | -18.05 | 5.69 |" in capsys.readouterr().out


def test_plot_command_refuses_a_negative_gamma(tmp_path, capsys):
    assert cli.plot_main(["losses", "--gamma", "-1", "--out", str(tmp_path)]) == 2
    assert "gamma must be >= 0" in capsys.readouterr().err


def test_analysis_and_the_plot_command_do_not_import_tensorflow(tmp_path):
    code = (
        "import sys; from fgl_retinanet import cli; "
        f"cli.plot_main(['losses', '--gamma', '2', '--out', {str(tmp_path)!r}]); "
        "sys.exit('tensorflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gradients.png").is_file()
