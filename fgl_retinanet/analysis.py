"""Loss analysis without TensorFlow: FL, the effective FGL objective, their gradients, plots.

    fgl-plot losses --gamma 1 2 --out figures/

All functions take the target probability ``p`` (``p_t`` of the losses, alpha = 1) and work in
float64 numpy. FGL's gradient with respect to ``p`` is ``-(1 - p)**gamma / p``; integrating it
from ``p`` to 1 gives the objective that FGL effectively minimises,
``L(p) = integral_p^1 (1 - z)**gamma / z dz``, with ``L(1) = 0``. FL's gradient is FGL's plus the
residual ``R(p) = gamma * (1 - p)**(gamma - 1) * log(p) <= 0``; since ``FL - L`` has derivative
``R`` and vanishes at 1, ``L <= FL`` on (0, 1].

This module also reads and plots the ``diagnostics.csv`` files that
`fgl_retinanet.diagnostics.GradientDiagnostics` writes during training.
"""

import csv
import logging
from pathlib import Path

import numpy as np
from scipy import special

# Target-probability bins of the training diagnostics (hard, medium, easy), shared with
# fgl_retinanet.diagnostics: p_t < 0.5 is on the wrong side of the decision boundary.
P_T_BIN_EDGES = (0.5, 0.9)
P_T_BINS = ("hard", "medium", "easy")

# Columns of diagnostics.csv, in order; the callback writes them, `read_diagnostics` parses them.
DIAGNOSTIC_COLUMNS = (
    "epoch", "step",
    *(f"grad_{side}_{name}" for side in ("pos", "neg") for name in P_T_BINS),
    *(f"count_{side}_{name}" for side in ("pos", "neg") for name in P_T_BINS),
    "grad_total", "residual_share", "saturated", "num_positive", "normalizer",
)  # fmt: skip

# Relative size of a series term below which a sum is converged (below float64's 2.2e-16).
_SERIES_TOLERANCE = 1e-17

# Terms of the power series in 1 - p evaluated at once, so long sums stay vectorised.
_SERIES_CHUNK = 256

logger = logging.getLogger(__name__)


def cross_entropy(p: np.ndarray) -> np.ndarray:
    """Returns ``CE(p) = -log(p)``, elementwise, for p in (0, 1]."""
    return -np.log(_probabilities(p))


def focal_loss_value(p: np.ndarray, gamma: float) -> np.ndarray:
    """Returns ``FL(p) = -(1 - p)**gamma * log(p)`` (alpha = 1), elementwise, for p in (0, 1]."""
    p = _probabilities(p)
    return -np.power(1.0 - p, _gamma(gamma)) * np.log(p)


def effective_focal_gradient_loss(p: np.ndarray | float, gamma: float) -> np.ndarray:
    """Returns the objective whose gradient is FGL's: ``L(p) = integral_p^1 (1 - z)**gamma / z dz``.

    Exact for every real ``gamma >= 0``, through two convergent series chosen per element:

    - ``p < p_switch``: ``L(p) = -log(p) - H_gamma - sum_{k>=1} binom(gamma, k) (-p)**k / k``,
      with the harmonic number ``H_gamma = digamma(gamma + 1) + euler_gamma``. For an integer
      ``gamma`` the sum stops at ``k = gamma``: this is the closed form. The series converges
      at least like ``p**k``.
    - ``p >= p_switch``, with ``q = 1 - p``:
      ``L(p) = sum_{k>=0} q**(gamma + k + 1) / (gamma + k + 1)``, from ``u = 1 - z``:
      ``integral_0^q u**gamma / (1 - u) du``. Its terms are positive and shrink like ``q**k``,
      so it keeps full relative accuracy as ``L -> 0`` at ``p -> 1``.
      For an integer ``gamma`` it equals ``-log(p) - sum_{k=1}^{gamma} q**k / k``, whose
      subtraction would lose the digits there.

    ``p_switch = min(1/2, 1/(gamma + 1))`` keeps the first series away from cancellation (its
    terms stay below ``1/k!`` relative to ``log(p)``); the second series then needs about
    ``37 / -log(1 - p_switch)`` terms (about 90 at gamma 2, 3,700 at gamma 100). Checked against
    numerical quadrature to 1e-13 relative for gamma up to 100 (tests: 1e-8, gamma <= 20).

    NOTE: the post ("Focal Gradient Loss: are we looking at focal loss correctly?", 2019) prints
    the integer-gamma objective as ``-log(p) - sum_{i=1}^{gamma} binom(gamma, i) (-p)**i / i``,
    which omits the constant ``-H_gamma`` (``-1`` at gamma 1, ``-3/2`` at gamma 2) and so is
    ``H_gamma`` at ``p = 1``; its plot does keep ``L(1) = 0``, as this function does:
    ``L(0.005) = 4.30`` at gamma 1 and ``3.81`` at gamma 2.

    Args:
        p: target probabilities in (0, 1], any shape.
        gamma: focusing exponent, ``>= 0``.

    Returns:
        float64 array of ``L(p)``, the shape of ``p``; 0 where ``p == 1``.

    Raises:
        ValueError: for ``gamma < 0``, a non-finite gamma, or ``p`` outside (0, 1] or NaN.
    """
    gamma = _gamma(gamma)
    p = _probabilities(p)
    if gamma == 0.0:
        return -np.log(p)
    result = np.empty_like(p)
    switch = min(0.5, 1.0 / (gamma + 1.0))
    near_zero = p < switch
    result[near_zero] = _series_in_p(p[near_zero], gamma)
    result[~near_zero] = _series_in_one_minus_p(1.0 - p[~near_zero], gamma)
    return result


def focal_gradient_residual(p: np.ndarray | float, gamma: float) -> np.ndarray:
    """Returns FL's residual ``R(p) = gamma * (1 - p)**(gamma - 1) * log(p) = -gamma FL_{gamma-1}``.

    ``dFL/dp = dFGL/dp + R(p)``, with ``dFGL/dp = -(1 - p)**gamma / p``; ``R <= 0``, so FL's
    gradient is always the larger in magnitude.

    Args:
        p: target probabilities in (0, 1], any shape.
        gamma: focusing exponent, ``>= 0``.

    Returns:
        float64 array of ``R(p)``, the shape of ``p``; 0 at gamma 0 and at ``p == 1`` (its limit
        for every gamma > 0, also for gamma < 1 where ``(1 - p)**(gamma - 1)`` diverges).
    """
    gamma = _gamma(gamma)
    p = _probabilities(p)
    if gamma == 0.0:
        return np.zeros_like(p)
    below_one = p < 1.0
    result = np.zeros_like(p)
    inner = p[below_one]
    result[below_one] = gamma * np.power(1.0 - inner, gamma - 1.0) * np.log(inner)
    return result


def focal_gradient_loss_derivative(p: np.ndarray | float, gamma: float) -> np.ndarray:
    """Returns ``dFGL/dp = -(1 - p)**gamma / p``, the derivative of the effective objective."""
    p = _probabilities(p)
    return -np.power(1.0 - p, _gamma(gamma)) / p


def focal_loss_derivative(p: np.ndarray | float, gamma: float) -> np.ndarray:
    """Returns ``dFL/dp = -(1 - p)**gamma / p + R(p)``, computed as that sum."""
    return focal_gradient_loss_derivative(p, gamma) + focal_gradient_residual(p, gamma)


def loss_curves(p: np.ndarray, gammas: list[float]) -> tuple[dict, dict]:
    """Returns the post's two sets of curves over ``p``, as columns keyed by CSV header.

    Args:
        p: (points,) target probabilities in (0, 1].
        gammas: focusing exponents, one set of curves each.

    Returns:
        ``(objectives, gradients)``: dicts of (points,) arrays. Objectives: ``p``, ``ce`` and per
        gamma ``fl_gamma_G`` and ``fgl_gamma_G``; gradients (d/dp, alpha = 1): ``p``,
        ``ce_grad`` and per gamma ``fl_grad_gamma_G``, ``fgl_grad_gamma_G``,
        ``residual_abs_gamma_G``.
    """
    p = _probabilities(p)
    objectives = {"p": p, "ce": cross_entropy(p)}
    gradients = {"p": p, "ce_grad": -1.0 / p}
    for gamma in gammas:
        tag = _gamma_tag(gamma)
        objectives[f"fl_gamma_{tag}"] = focal_loss_value(p, gamma)
        objectives[f"fgl_gamma_{tag}"] = effective_focal_gradient_loss(p, gamma)
        gradients[f"fl_grad_gamma_{tag}"] = focal_loss_derivative(p, gamma)
        gradients[f"fgl_grad_gamma_{tag}"] = focal_gradient_loss_derivative(p, gamma)
        gradients[f"residual_abs_gamma_{tag}"] = np.abs(focal_gradient_residual(p, gamma))
    return objectives, gradients


def write_loss_figures(out: Path, gammas: list[float], points: int = 200) -> dict[str, Path]:
    """Writes objectives.png/.csv and gradients.png/.csv for the given gammas into `out`.

    The grid is ``p = k / points`` for ``k = 1 .. points`` (0.005 to 1 by default, the post's
    range), so round values such as 0.05 are exact grid points.

    Returns:
        The written files by name, e.g. ``{"objectives.png": Path(...), ...}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = np.arange(1, points + 1) / points
    objectives, gradients = loss_curves(p, gammas)
    written = {}
    for name, columns in (("objectives", objectives), ("gradients", gradients)):
        written[f"{name}.csv"] = _write_columns(out / f"{name}.csv", columns)
    written["objectives.png"] = _plot_objectives(out / "objectives.png", objectives, gammas)
    written["gradients.png"] = _plot_gradients(out / "gradients.png", gradients, gammas)
    return written


def read_diagnostics(path: Path) -> dict[str, np.ndarray]:
    """Reads a diagnostics.csv (or the run directory holding one) into float64 columns.

    Returns:
        {column: (rows,) array} for every column of `DIAGNOSTIC_COLUMNS` present in the file.

    Raises:
        FileNotFoundError: when there is no diagnostics.csv (the run had diagnostics off).
        ValueError: when the file lacks the step or residual columns (not a diagnostics file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "diagnostics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (was train.diagnostics_every 0?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = rows[0].keys() if rows else ()
    missing = [c for c in ("step", "residual_share", "grad_total") if c not in header]
    if rows and missing:
        raise ValueError(f"{path} lacks columns {', '.join(missing)}: not a diagnostics.csv")
    return {
        column: np.array([_number(row[column]) for row in rows], dtype=np.float64)
        for column in DIAGNOSTIC_COLUMNS
        if column in header or not rows
    }


def plot_diagnostics(runs_by_loss: dict[str, list[Path]], out_png: Path) -> Path:
    """Writes `diagnostics_figure(runs_by_loss)` to `out_png` and returns `out_png`."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    diagnostics_figure(runs_by_loss).savefig(out_png, dpi=110)
    return out_png


def diagnostics_figure(runs_by_loss: dict[str, list[Path]]):
    """Draws the gradient diagnostics of several losses side by side, one column per loss.

    Rows: the summed |dL/dlogit| of positive and of negative elements, the share of each from
    each p_t bin, FL's residual share, and the number of saturated probabilities. Several
    runs of one loss (seeds) are drawn as their mean over the steps they share, with a band from
    their minimum to their maximum.

    Args:
        runs_by_loss: {label, e.g. "focal": [run directory or diagnostics.csv, ...]}.

    Returns:
        A matplotlib Figure (not managed by pyplot).

    Raises:
        ValueError: when `runs_by_loss` is empty or a label has no runs.
        FileNotFoundError: when a run has no diagnostics.csv.
    """
    if not runs_by_loss or not all(runs_by_loss.values()):
        raise ValueError("plot_diagnostics needs at least one run for every loss")
    from matplotlib.figure import Figure

    rows = (
        ("totals", "sum |dL/dlogit| (log scale)"),
        ("pos", "share of |dL/dlogit|, positives"),
        ("neg", "share of |dL/dlogit|, negatives"),
        ("residual_share", "residual share of FL's gradient"),
        ("saturated", "saturated probabilities"),
    )
    colors = {"hard": "tab:red", "medium": "tab:orange", "easy": "tab:green"}
    figure = Figure(figsize=(5.0 * len(runs_by_loss), 13.0), layout="constrained")
    axes = figure.subplots(len(rows), len(runs_by_loss), sharex="col", sharey="row", squeeze=False)
    for column, (label, paths) in enumerate(runs_by_loss.items()):
        runs = [read_diagnostics(path) for path in paths]
        steps = _shared_steps(runs)
        axes[0, column].set_title(f"{label} ({len(runs)} run{'s' * (len(runs) > 1)})")
        for row, (key, ylabel) in enumerate(rows):
            axis = axes[row, column]
            if key == "totals":
                # Positive against negative elements, in the units the optimizer sees.
                for side, color, name in (("pos", "tab:purple", "positives"),
                                          ("neg", "tab:gray", "negatives")):  # fmt: skip
                    total = sum(_aligned(runs, steps, f"grad_{side}_{b}") for b in P_T_BINS)
                    _band(axis, steps, total, color, name)
                axis.set_yscale("log")
            elif key in ("pos", "neg"):
                # Each bin's share of that side's gradient, so runs of different scale compare.
                total = sum(_aligned(runs, steps, f"grad_{key}_{b}") for b in P_T_BINS)
                for name in P_T_BINS:
                    share = _aligned(runs, steps, f"grad_{key}_{name}") / np.maximum(total, 1e-30)
                    _band(axis, steps, share, colors[name], f"{name} p_t")
                axis.set_ylim(-0.02, 1.02)
            elif key == "residual_share":
                _band(axis, steps, _aligned(runs, steps, key), "tab:blue", None)
                axis.set_ylim(-0.02, 1.02)
            else:
                # Counts: a run without saturation stays visible as a line just above the axis.
                values = _aligned(runs, steps, key)
                _band(axis, steps, values, "tab:blue", None)
                top = max(1.0, float(np.nanmax(values, initial=0.0)))
                axis.set_ylim(-0.05 * top, 1.05 * top)
            if column == 0:
                axis.set_ylabel(ylabel)
                if key in ("totals", "pos", "neg"):
                    axis.legend(loc="best", fontsize="small")
            axis.grid(alpha=0.3)
        axes[-1, column].set_xlabel("training step")
    return figure


def _probabilities(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if np.any(~(p > 0.0)) or np.any(p > 1.0):
        raise ValueError("probabilities must lie in (0, 1] (no NaN)")
    return p


def _gamma(gamma) -> float:
    gamma = float(gamma)
    if not np.isfinite(gamma) or gamma < 0.0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return gamma


def _gamma_tag(gamma: float) -> str:
    return f"{float(gamma):g}"


def _series_in_p(p: np.ndarray, gamma: float) -> np.ndarray:
    """``-log p - H_gamma - sum_k binom(gamma, k) (-p)**k / k`` for p < min(1/2, 1/(gamma+1))."""
    if p.size == 0:
        return p.copy()
    integer = gamma == np.floor(gamma)
    if integer:
        # Summed exactly so that gamma 1 gives -log p - 1 to the last bit.
        harmonic = sum(1.0 / k for k in range(1, int(gamma) + 1))
    else:
        harmonic = special.digamma(gamma + 1.0) + np.euler_gamma
    log_p = np.log(p)
    scale = np.abs(log_p) + harmonic + 1.0
    total = np.zeros_like(p)
    coefficient = 1.0
    power = np.ones_like(p)
    k = 0
    while True:
        k += 1
        coefficient *= (gamma - k + 1.0) / k
        power *= -p
        if coefficient == 0.0:
            # An integer gamma: binom(gamma, k) = 0 from k = gamma + 1 on; the sum was finite.
            break
        term = coefficient * power / k
        total += term
        # Past k > gamma the terms shrink by at least p <= 1/2 each, so the tail is below |term|.
        if k > gamma and np.max(np.abs(term) / scale) < _SERIES_TOLERANCE:
            break
    return -log_p - harmonic - total


def _series_in_one_minus_p(q: np.ndarray, gamma: float) -> np.ndarray:
    """``sum_{k>=0} q**(gamma + k + 1) / (gamma + k + 1)`` for q = 1 - p <= 1 - p_switch."""
    if q.size == 0:
        return q.copy()
    with np.errstate(divide="ignore"):
        log_q = np.log(q)[:, np.newaxis]
    total = np.zeros(q.shape)
    start = 0
    while True:
        # A chunk of terms at once: exponents gamma + 1 + k for k in [start, start + chunk).
        exponents = gamma + 1.0 + np.arange(start, start + _SERIES_CHUNK)
        terms = np.exp(exponents * log_q) / exponents
        total += terms.sum(axis=1)
        last = terms[:, -1]
        # Every later term is at most q times the previous one: the tail is below
        # last * q / (1 - q).
        tail = last * q / (1.0 - q)
        if np.all(tail <= _SERIES_TOLERANCE * total):
            return total
        start += _SERIES_CHUNK


def _write_columns(path: Path, columns: dict[str, np.ndarray]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for values in zip(*columns.values()):
            writer.writerow([f"{value:.10g}" for value in values])
    return path


def _plot_objectives(path: Path, curves: dict, gammas: list[float]) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    axis = figure.subplots()
    p = curves["p"]
    axis.plot(p, curves["ce"], color="black", label="CE = -log p")
    for index, gamma in enumerate(gammas):
        tag = _gamma_tag(gamma)
        color = f"C{index}"
        axis.plot(p, curves[f"fl_gamma_{tag}"], color=color, label=f"FL, gamma {tag}")
        axis.plot(
            p, curves[f"fgl_gamma_{tag}"], color=color, linestyle="--",
            label=f"effective FGL, gamma {tag}",
        )  # fmt: skip
    axis.set_xlim(0.0, 1.0)
    axis.set_ylim(0.0, None)
    axis.set_xlabel("p (probability of the target class)")
    axis.set_ylabel("loss")
    axis.set_title("Objectives: FGL's effective loss is at most FL")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.savefig(path, dpi=110)
    return path


def _plot_gradients(path: Path, curves: dict, gammas: list[float]) -> Path:
    from matplotlib.figure import Figure

    # One panel per gamma, as the curves of different gammas overlap near p = 0; the y range
    # is cut where CE' = -1/p leaves it, so the focal curves stay readable.
    figure = Figure(figsize=(5.0 * len(gammas), 4.5), layout="constrained")
    axes = figure.subplots(1, len(gammas), sharey=True, squeeze=False)[0]
    p = curves["p"]
    for axis, gamma in zip(axes, gammas):
        tag = _gamma_tag(gamma)
        axis.plot(p, curves["ce_grad"], color="black", label="CE'")
        axis.plot(p, curves[f"fl_grad_gamma_{tag}"], color="C0", label="FL'")
        axis.plot(p, curves[f"fgl_grad_gamma_{tag}"], color="C1", linestyle="--", label="FGL'")
        axis.plot(p, curves[f"residual_abs_gamma_{tag}"], color="C2", label="|R|")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xlim(0.0, 1.0)
        axis.set_ylim(-30.0, 10.0)
        axis.set_title(f"gamma {tag}")
        axis.set_xlabel("p (probability of the target class)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    axes[0].set_ylabel("d loss / d p")
    figure.savefig(path, dpi=110)
    return path


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else np.nan


def _shared_steps(runs: list[dict]) -> np.ndarray:
    steps = set(runs[0]["step"].tolist())
    for run in runs[1:]:
        steps &= set(run["step"].tolist())
    return np.array(sorted(steps), dtype=np.float64)


def _aligned(runs: list[dict], steps: np.ndarray, column: str) -> np.ndarray:
    """(runs, steps) values of `column` at the shared steps; the last row wins for a step."""
    out = np.full((len(runs), steps.size), np.nan)
    for index, run in enumerate(runs):
        position = {step: i for i, step in enumerate(run["step"].tolist())}
        out[index] = [run[column][position[step]] for step in steps.tolist()]
    return out


def _band(axis, steps: np.ndarray, values: np.ndarray, color: str, label: str | None) -> None:
    axis.plot(steps, np.nanmean(values, axis=0), color=color, label=label)
    if values.shape[0] > 1:
        axis.fill_between(
            steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.2
        )
