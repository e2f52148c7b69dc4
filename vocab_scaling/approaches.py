"""The paper's three ways to the compute-optimal vocabulary, its published constants, and `predict`.

- Approach 1 (IsoFLOPs): keep the lowest-L_u run at each budget, fit N_nv, N_v, H as power laws of C.
- Approach 2 (∂C/∂V = 0): the V that minimises FLOPs at fixed N_nv and H gives the exponent γ of N_v ∝ N_nv^γ;
  the level comes from one empirical anchor (the smallest model's best N_v).
- Approach 3 (parametric): fit L_u(N_nv, N_v, D), then solve ∂L_u/∂V = 0 at a budget. The only approach that
  answers for under- or over-trained budgets.
tests/test_vocab_paper_fits.py refits the published constants from the paper's own data (vocab_scaling/data/) and
tests/test_vocab_predict.py checks `predict` against the paper's Table 1 of compute-optimal vocabularies.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
from numpy.typing import ArrayLike

from lm_core import atomic_files
from lm_core.errors import UserError
from vocab_scaling.fitting import (
    FLOPS_UNIT,
    PARAMS_UNIT,
    VOCAB_UNIT,
    WIDTH_UNIT,
    PowerLaw,
    VocabLossLaw,
    finite_positive,
    fit_power_law,
    fit_vocab_loss,
)
from vocab_scaling.flops import width_for
from vocab_scaling.reference import fit_power_law_as_reference
from vocab_scaling.tokenization_curve import PAPER_F, FCurve

PAPER_MIN_FLOPS = 2.18e17  # Approach 3: the paper dropped points with C below this before fitting
APPROACHES = ("1", "2", "3")


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Every constant `predict` needs. Field names are the JSON keys.

    Approach 1: N_nv = k1·C^iso_alpha1, N_v = k2·C^iso_alpha2 (ln k natural logs, raw units: parameters, FLOPs).
    Approach 2: N_v = n_v0 · (N_nv / n_nv0)^gamma.
    Approach 3: L_u = −E + A1/N_nv^alpha1 + A2/N_v^alpha2 + B/D^beta in NORMALISED units (N in 1e6, D in 1e9);
    the names match `VocabLossLaw`, so `dataclasses.replace(PAPER_COEFFICIENTS, **law.as_dict())` swaps in a fit.
    f(V) = f_a·ln²V + f_b·lnV + f_c tokens per character.
    """

    ln_k1: float
    iso_alpha1: float
    ln_k2: float
    iso_alpha2: float
    gamma: float
    n_v0: float
    n_nv0: float
    E: float
    A1: float
    A2: float
    B: float
    alpha1: float
    alpha2: float
    beta: float
    f_a: float
    f_b: float
    f_c: float

    @property
    def loss_law(self) -> VocabLossLaw:
        return VocabLossLaw(E=self.E, A1=self.A1, A2=self.A2, B=self.B, alpha1=self.alpha1, alpha2=self.alpha2,
                            beta=self.beta)

    @property
    def f_curve(self) -> FCurve:
        return FCurve(self.f_a, self.f_b, self.f_c)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "coefficients") -> Coefficients:
        """Strict: every field present as a finite number (extra keys, e.g. notes, are ignored)."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a JSON object of constants, got {type(values).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"{source} lacks constant(s) {', '.join(missing)}; it needs all of: {', '.join(names)}")
        bad = [name for name in names
               if isinstance(values[name], bool) or not isinstance(values[name], int | float)
               or not math.isfinite(values[name])]
        if bad:
            raise UserError(f"{source}: constant(s) {', '.join(f'{n}={values[n]!r}' for n in bad)} must be finite "
                            "numbers")
        return cls(**{name: float(values[name]) for name in names})

    @classmethod
    def from_json(cls, path: str | Path) -> Coefficients:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise UserError(f"cannot read coefficients file {str(path)!r}: {error.strerror}") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"coefficients file {str(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(values, source=f"coefficients file {str(path)!r}")

    def save_json(self, path: str | Path) -> Path:
        return write_json_atomically(path, self.to_dict())


# The paper's constants at full precision (those its reference code, github.com/sail-sg/scaling-with-vocab,
# fitted; `vocab_scaling.reference`) and its SlimPajama f(V) (`PAPER_F`).
PAPER_COEFFICIENTS = Coefficients(
    ln_k1=-2.4846510161625193, iso_alpha1=0.5, ln_k2=-1.589031299255507, iso_alpha2=0.4163622634135234,
    gamma=0.8353974035228025, n_v0=6144 * 512, n_nv0=33e6,
    E=5.5327846803337435, A1=1.8313851559554126, A2=0.19584238398665638, B=2.1241123120064955,
    alpha1=0.44660634152009615, alpha2=0.6707374679896795, beta=0.44660634152009615,
    f_a=PAPER_F.a, f_b=PAPER_F.b, f_c=PAPER_F.c,
)


def write_json_atomically(path: str | Path, values: dict[str, Any]) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a result file."""
    try:
        return atomic_files.write_json_atomically(path, values)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}); valid: a path in a writable "
                        "directory") from None


def _solve_positive_root(equation: Callable[[float], float], start: float, scale: Callable[[float], float],
                         what: str) -> float:
    """fsolve from `start`; the root must be positive, finite and make |equation| tiny relative to `scale`."""
    def vector_equation(x: np.ndarray) -> list[float]:
        return [equation(max(float(x[0]), 1e-12))]  # the laws are undefined at V ≤ 0

    root, _, flag, message = scipy.optimize.fsolve(vector_equation, [start], full_output=True, xtol=1e-12)
    value = float(root[0])
    if not (flag == 1 and math.isfinite(value) and value > 0 and abs(equation(value)) <= 1e-6 * abs(scale(value))):
        raise UserError(f"{what}: the vocabulary equation did not converge from V={start:g} ({message.strip()})")
    return value


# --- Approach 1: IsoFLOPs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Approach1Fit:
    """N_nv = k1·C^α1, N_v = k2·C^α2, H = k3·C^α3 fitted on the IsoFLOP envelope (α1 = α3 = 0.5 by default)."""

    n_nv: PowerLaw
    n_v: PowerLaw
    chars: PowerLaw
    envelope: np.ndarray  # indices of the input points on the envelope, in increasing FLOPs


def isoflop_envelope(flops: ArrayLike, loss: ArrayLike) -> np.ndarray:
    """Indices of the points that are the best (lowest L_u) yet seen at their budget, in increasing FLOPs.

    Walking the points (every run, every logged step) in increasing C and keeping those that beat the running
    minimum of L_u leaves, for each budget, the lowest-loss configuration reachable with at most that budget:
    the envelope whose configurations are compute-optimal. This keeps the points it is given; the reference
    code first adds virtual runs interpolated between the measured ones (`reference.interpolate_runs`).
    """
    c = np.asarray(flops, dtype=np.float64).ravel()
    values = np.asarray(loss, dtype=np.float64).ravel()
    order = np.lexsort((values, c))  # by FLOPs, ties by loss so the better of two equal budgets comes first
    keep, best = [], math.inf
    for index in order:
        if values[index] < best:
            keep.append(index)
            best = values[index]
    return np.asarray(keep, dtype=np.int64)


APPROACH1_FITS = ("huber", "reference")


def fit_approach1(flops: ArrayLike, loss: ArrayLike, n_nv: ArrayLike, n_v: ArrayLike, chars: ArrayLike, *,
                  fixed_alpha: float | None = 0.5, fit: str = "huber") -> Approach1Fit:
    """Power-law fits of N_nv, N_v and H against C on the envelope (the paper fixes α1 = α3 at 0.5).

    fit="huber": the converged Huber fit (`fit_power_law`); fit="reference": the reference code's optimizer
    (`reference.fit_power_law_as_reference`), which the published constants came from.
    """
    if fit not in APPROACH1_FITS:
        raise UserError(f"Approach 1: fit={fit!r} is unknown; valid: {', '.join(APPROACH1_FITS)}")
    data = finite_positive("Approach 1", flops=flops, N_nv=n_nv, N_v=n_v, H=chars)
    values = np.asarray(loss, dtype=np.float64).ravel()
    if values.shape != data["flops"].shape or not np.all(np.isfinite(values)):
        raise UserError("Approach 1: loss must be one finite value per point")
    envelope = isoflop_envelope(data["flops"], values)
    c = data["flops"][envelope]

    def power_law(y: np.ndarray, exponent: float | None, what: str) -> PowerLaw:
        if fit == "reference":
            return fit_power_law_as_reference(c, y, exponent=exponent, what=what)
        return fit_power_law(c, y, exponent=exponent, exponent_bounds=(0.0, 1.0), what=what)

    return Approach1Fit(n_nv=power_law(data["N_nv"][envelope], fixed_alpha, "Approach 1 N_nv(C)"),
                        n_v=power_law(data["N_v"][envelope], None, "Approach 1 N_v(C)"),
                        chars=power_law(data["H"][envelope], fixed_alpha, "Approach 1 H(C)"), envelope=envelope)


def optimal_flops(n_nv: float, coefficients: Coefficients = PAPER_COEFFICIENTS) -> float:
    """Approach 1's compute-optimal budget for N_nv: C = (N_nv/k1)^(1/α1), i.e. (N_nv/k1)² with α1 = 0.5."""
    return math.exp((math.log(n_nv) - coefficients.ln_k1) / coefficients.iso_alpha1)


def approach1_vocab_params(n_nv: float, coefficients: Coefficients = PAPER_COEFFICIENTS) -> float:
    """N_v = k2 · C^α2 at the compute-optimal C for N_nv."""
    return math.exp(coefficients.ln_k2 + coefficients.iso_alpha2 * math.log(optimal_flops(n_nv, coefficients)))


# --- Approach 2: ∂C/∂V = 0 -------------------------------------------------------------------------------------


def flops_vocab_derivative(vocab_size: float, n_nv: float, d: float, chars: float = 1.0,
                           f: FCurve = PAPER_F) -> float:
    """∂C/∂V = 6H[(N_nv + V·d)·f'(V) + f(V)·d], f'(V) = (2a·lnV + b)/V (0 above the 200K cap)."""
    return 6.0 * chars * ((n_nv + vocab_size * d) * f.derivative(vocab_size) + f(vocab_size) * d)


def flops_optimal_vocab(n_nv: float, d: float, f: FCurve = PAPER_F) -> float:
    """The V minimising FLOPs at fixed N_nv and H: root of ∂C/∂V by fsolve from V = 1000, as the paper solves it.

    H cancels, and dividing by 6H·d leaves (N_nv/d + V)·f'(V) + f(V), which is O(1) at the root.
    """
    return _solve_positive_root(lambda v: (n_nv / d + v) * f.derivative(v) + f(v), 1000.0, f,
                                what=f"Approach 2 (N_nv={n_nv:.3g}, d={d:g})")


def fit_gamma(n_nv: ArrayLike, widths: ArrayLike, f: FCurve = PAPER_F) -> float:
    """γ of log(N_v/N_v0) = γ·log(N_nv/N_nv0) over the ∂C/∂V = 0 solutions (Huber, γ in [0, 1)).

    The reference (N_nv0, N_v0) is the smallest model's solution: only the slope is kept, the level comes
    from `empirical_anchor`: the derivative fixes only how N_v scales, not its absolute size.
    """
    data = finite_positive("Approach 2", N_nv=n_nv, d=widths)
    order = np.argsort(data["N_nv"])
    models, dims = data["N_nv"][order], data["d"][order]
    n_v = np.array([flops_optimal_vocab(n, d, f) * d for n, d in zip(models, dims, strict=True)])
    if len(models) < 2 or models[-1] == models[0]:
        raise UserError("Approach 2: fitting γ needs at least two different N_nv")
    if len(models) == 2:  # one ratio determines the slope exactly; the robust fit needs more points than unknowns
        return float(math.log(n_v[1] / n_v[0]) / math.log(models[1] / models[0]))
    law = fit_power_law(models[1:] / models[0], n_v[1:] / n_v[0], log_k=0.0, exponent_bounds=(0.0, 1.0),
                        what="Approach 2 γ")
    return law.exponent


def empirical_anchor(n_nv: ArrayLike, n_v: ArrayLike, loss: ArrayLike) -> tuple[float, float]:
    """(N_nv0, N_v0): the smallest model and its best N_v by L_u, Approach 2's anchor taken from our own sweep.

    Compare losses at one budget (e.g. each run's final, equal-FLOPs evaluation) so only V differs.
    """
    data = finite_positive("Approach 2 anchor", N_nv=n_nv, N_v=n_v)
    values = np.asarray(loss, dtype=np.float64).ravel()
    smallest = data["N_nv"] == data["N_nv"].min()
    candidates = np.where(smallest & np.isfinite(values), values, np.inf)
    if not np.isfinite(candidates.min()):
        raise UserError("Approach 2 anchor: the smallest model has no finite loss")
    best = int(np.argmin(candidates))
    return float(data["N_nv"][best]), float(data["N_v"][best])


def approach2_vocab_params(n_nv: float, coefficients: Coefficients = PAPER_COEFFICIENTS) -> float:
    """N_v = N_v0 · (N_nv / N_nv0)^γ."""
    return coefficients.n_v0 * (n_nv / coefficients.n_nv0) ** coefficients.gamma


# --- Approach 3: parametric fit, ∂L_u/∂V = 0 at a budget -------------------------------------------------------


def fit_approach3(n_nv: ArrayLike, vocab_size: ArrayLike, d: ArrayLike, tokens: ArrayLike, loss: ArrayLike, *,
                  flops: ArrayLike | None = None, min_flops: float = 0.0, strict: bool = True) -> VocabLossLaw:
    """`fit_vocab_loss` on the points with C ≥ min_flops (the paper used `PAPER_MIN_FLOPS`).

    C is `flops` where given, else 6 (N_nv + V·d)·D. strict=False: see `fit_vocab_loss`.
    """
    columns = [np.asarray(x, dtype=np.float64).ravel() for x in (n_nv, vocab_size, d, tokens, loss)]
    if min_flops > 0:
        c = np.asarray(flops, dtype=np.float64).ravel() if flops is not None else (
            6.0 * (columns[0] + columns[1] * columns[2]) * columns[3])
        kept = c >= min_flops
        if not kept.any():
            raise UserError(f"Approach 3: no point has C ≥ min_flops={min_flops:g} (largest C: {c.max():.3g})")
        columns = [column[kept] for column in columns]
    return fit_vocab_loss(*columns, strict=strict)


def loss_vocab_derivative(vocab_k: float, n_nv: float, d: float, flops: float, law: VocabLossLaw) -> float:
    """∂L_u/∂V / d in normalised units (V in thousands) with D = C / (6 (N_nv + V·d)) substituted.

    L_u(V) = ... + A2·(V·d)^−α2 + B·(6 (N_nv + V·d) / C)^β, so
    ∂L_u/∂V = d·[−α2·A2·(V·d)^(−α2−1) + β·B·(6/C)^β·(N_nv + V·d)^(β−1)].
    """
    n, width, c = n_nv / PARAMS_UNIT, d / WIDTH_UNIT, flops / FLOPS_UNIT
    n_v = vocab_k * width
    return (-law.alpha2 * law.A2 * n_v ** (-law.alpha2 - 1.0)
            + law.beta * law.B * (6.0 / c) ** law.beta * (n + n_v) ** (law.beta - 1.0))


def approach3_vocab(n_nv: float, d: float, flops: float, law: VocabLossLaw) -> float:
    """The V (in tokens) with ∂L_u/∂V = 0 at budget C: fsolve from V = 1K in normalised units, as the paper does.

    The root is unique: the N_v term's slope falls faster in V than the data term's, so their sum crosses zero
    once. Smaller budgets (under-training) move it down, larger ones (over-training) up.
    """
    width = d / WIDTH_UNIT
    root = _solve_positive_root(
        lambda v: loss_vocab_derivative(v, n_nv, d, flops, law), 1.0,
        lambda v: law.alpha2 * law.A2 * (v * width) ** (-law.alpha2 - 1.0),
        what=f"Approach 3 (N_nv={n_nv:.3g}, d={d:g}, C={flops:.3g})")
    return root * VOCAB_UNIT


# --- the predictor ---------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number") from None
    if not (math.isfinite(number) and number > 0):
        raise UserError(f"{name}={value!r} must be a finite number > 0")
    return number


def predict(n_nv: float, flops: float | None = None, approach: int | str = "all",
            coefficients: Coefficients = PAPER_COEFFICIENTS, d: float | None = None) -> dict[str, Any]:
    """Optimal vocabulary for N_nv non-vocabulary parameters.

    Approaches 1 and 2 answer for the compute-optimal budget (Approach 1's C = (N_nv/k1)²); Approach 3 answers
    for `flops` (default: that same compute-optimal C). d defaults to the paper's width table d(N_nv).
    Returns {"nnv", "d", "flops" (Approach 3's budget), "optimal_flops", "approach<i>": {"V", "N_v"}} with V
    unrounded, in tokens, for each requested approach.
    """
    n_nv = _positive("n_nv", n_nv)
    requested = APPROACHES if str(approach) == "all" else (str(approach),)
    if requested[0] not in APPROACHES:
        raise UserError(f"approach={approach!r} is unknown; valid: 1, 2, 3, all")
    width = float(width_for(n_nv)) if d is None else _positive("d", d)
    compute_optimal = optimal_flops(n_nv, coefficients)
    budget = compute_optimal if flops is None else _positive("flops", flops)
    result: dict[str, Any] = {"nnv": n_nv, "d": width, "flops": budget, "optimal_flops": compute_optimal}
    for name in requested:
        if name == "1":
            n_v = approach1_vocab_params(n_nv, coefficients)
        elif name == "2":
            n_v = approach2_vocab_params(n_nv, coefficients)
        else:
            n_v = approach3_vocab(n_nv, width, budget, coefficients.loss_law) * width
        result[f"approach{name}"] = {"V": n_v / width, "N_v": n_v}
    return result
