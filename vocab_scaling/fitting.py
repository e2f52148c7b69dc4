"""One robust fitter for every law in the paper, and the three laws it serves.

Scaling-law points are few and a couple of them are usually off (a diverged run, an unlucky seed), so the paper
(like Hoffmann et al. 2022) minimises a Huber loss (δ = 1e-3) of the residuals with L-BFGS-B from a grid of
starts and keeps the best solution. `robust_fit` is that procedure once; the laws differ only in their residuals:

- `fit_power_law`: y = k·x^α, residual log k + α log x − log y (Approaches 1 and 2);
- `fit_chinchilla`: L = E + A/N^α + B/D^β, residual LSE(a − α log N, b − β log D, e) − log L with a = log A,
  b = log B, e = log E (exactly Hoffmann et al.'s objective);
- `fit_vocab_loss`: L_u = −E + A1/N_nv^α1 + A2/N_v^α2 + B/D^β with α1 = β tied (Approach 3). Its residual is
  prediction − L_u, NOT a log-space residual: L_u can be negative, so there is no log to take (the paper fits
  Approach 3 with the Huber loss on L_u itself).

The two parametric laws are fitted in normalised units (N in 1e6 parameters, D in 1e9 tokens, V and d in 1e3)
so the log-coefficients are O(1) and one small grid of starts covers them; `fit_chinchilla` converts A and B back
to raw units, `fit_vocab_loss` returns the normalised constants, which is how the paper publishes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import glob
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import scipy
import scipy.optimize
from numpy.typing import ArrayLike

from lm_core.errors import UserError

HUBER_DELTA = 1e-3  # the paper's δ, the same as Hoffmann et al. 2022 (Chinchilla)
EXPONENT_RANGE = (0.1, 1.0)  # the paper's Approach 3 keeps only solutions with every exponent strictly inside
LAW_EXPONENTS = ("alpha1", "alpha2", "beta")

# Normalised units of the parametric laws, the ones the paper publishes Approach 3's constants in: N in millions,
# V and d in thousands (so N_v = V·d is in millions too), D in billions of tokens; hence C = 6·N·D is in units
# of 1e15.
PARAMS_UNIT = 1e6
VOCAB_UNIT = 1e3
WIDTH_UNIT = 1e3
TOKENS_UNIT = 1e9
FLOPS_UNIT = PARAMS_UNIT * TOKENS_UNIT

# theta [parameters] -> (residuals [points], jacobian [points, parameters])
Residuals = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One parameter: L-BFGS-B box bounds and the values the grid of starts tries."""

    name: str
    lower: float
    upper: float
    starts: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class FitResult:
    values: dict[str, float]  # every parameter by name, fixed and tied ones included
    objective: float  # Σ Huber(residual) / δ at the optimum
    score: float  # what selected this solution among the starts (the objective unless a score was given)
    starts: int  # starts tried
    converged: int  # starts L-BFGS-B reported converged
    accepted: int  # converged starts that passed `accept`


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """(Huber loss / δ, its derivative) per residual: r²/(2δ) inside |r| ≤ δ, |r| − δ/2 outside.

    Dividing by δ leaves the minimiser unchanged and makes the gradient O(1) per point, so L-BFGS-B's absolute
    tolerances mean the same thing whatever δ is.
    """
    absolute = np.abs(residuals)
    loss = np.where(absolute <= delta, 0.5 * residuals**2 / delta, absolute - 0.5 * delta)
    return loss, np.clip(residuals / delta, -1.0, 1.0)


@functools.cache
def _scipy_openblas() -> ctypes.CDLL | None:
    """scipy's bundled OpenBLAS (the one L-BFGS-B calls), or None where scipy was built otherwise."""
    pattern = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "libscipy_openblas*.so")
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "scipy_openblas_set_num_threads") and hasattr(lib, "scipy_openblas_get_num_threads"):
                return lib
    return None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run L-BFGS-B (or scipy's interpolators) with single-threaded BLAS.

    Its BLAS calls are on 5x5 matrices; OpenBLAS still wakes its thread pool for each, which on a busy 2-core
    machine made a 243-start fit take 32 s instead of 2.3 s (measured). Only the speed depends on this, so
    where scipy's OpenBLAS cannot be found nothing is changed.
    """
    lib = _scipy_openblas()
    if lib is None:
        yield
        return
    previous = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(previous)


@dataclasses.dataclass(frozen=True)
class _FreeParameters:
    """Which parameters L-BFGS-B optimises: θ_full = projection · θ_free + offset (fixed ones in the offset, a
    tied one a copy of its target's column)."""

    names: list[str]
    free: list[Parameter]
    projection: np.ndarray  # [parameters, free]
    offset: np.ndarray  # [parameters]

    def full(self, theta_free: np.ndarray) -> np.ndarray:
        return self.projection @ theta_free + self.offset

    def values(self, theta: np.ndarray) -> dict[str, float]:
        return dict(zip(self.names, map(float, theta), strict=True))


def _free_parameters(parameters: Sequence[Parameter], fixed: Mapping[str, float], tied: Mapping[str, str],
                     what: str) -> _FreeParameters:
    names = [p.name for p in parameters]
    for name in [*fixed, *tied, *tied.values()]:
        if name not in names:
            raise ValueError(f"{what}: unknown parameter {name!r}; parameters: {names}")
    free = [p for p in parameters if p.name not in fixed and p.name not in tied]
    if any(target in tied or target in fixed for target in tied.values()):
        raise ValueError(f"{what}: a parameter may only be tied to a free parameter: {dict(tied)}")
    if not free:
        raise ValueError(f"{what}: every parameter is fixed or tied; nothing to fit")
    free_index = {p.name: i for i, p in enumerate(free)}
    projection = np.zeros((len(parameters), len(free)))
    offset = np.zeros(len(parameters))
    for row, name in enumerate(names):
        if name in fixed:
            offset[row] = fixed[name]
        else:
            projection[row, free_index[tied.get(name, name)]] = 1.0
    return _FreeParameters(names, free, projection, offset)


def _huber_objective(residuals: Residuals, space: _FreeParameters,
                     delta: float) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """θ_free -> (Σ Huber(r) / δ, its gradient P^T J^T ψ(r)) with the analytic Jacobian J of `residuals`."""

    def objective(theta_free: np.ndarray) -> tuple[float, np.ndarray]:
        r, jacobian = residuals(space.full(theta_free))
        loss, psi = huber(r, delta)
        value = float(np.sum(loss))
        if not math.isfinite(value):  # steer L-BFGS-B's line search back from an overflow
            return math.inf, np.zeros(len(space.free))
        return value, space.projection.T @ (jacobian.T @ psi)

    return objective


def _converged(result: scipy.optimize.OptimizeResult, points: int) -> bool:
    # status 2 (line search could not improve) happens when the objective is at machine precision: a
    # converged solution, unless the gradient says otherwise.
    gradient_small = np.max(np.abs(result.jac), initial=0.0) < 1e-6 * points
    return math.isfinite(result.fun) and (result.status == 0 or (result.status == 2 and gradient_small))


@dataclasses.dataclass
class _Selection:
    """The best converged solution among the starts (`best`), and the best of those `accept` rejected."""

    best: tuple[float, np.ndarray, float] | None = None  # (rank, θ_full, objective)
    best_rejected: tuple[float, np.ndarray, float] | None = None
    converged: int = 0
    accepted: int = 0


def _select(outcomes: Sequence[scipy.optimize.OptimizeResult | None], residuals: Residuals,
            space: _FreeParameters, points: int, accept: Callable[[dict[str, float]], bool] | None,
            score: Callable[[np.ndarray], float] | None) -> _Selection:
    selection = _Selection()
    for result in outcomes:
        if result is None or not _converged(result, points):
            continue
        selection.converged += 1
        theta = space.full(result.x)
        rank = result.fun if score is None else score(residuals(theta)[0])
        candidate = (rank, theta, float(result.fun))
        if accept is not None and not accept(space.values(theta)):
            if selection.best_rejected is None or rank < selection.best_rejected[0]:
                selection.best_rejected = candidate
            continue
        selection.accepted += 1
        if selection.best is None or rank < selection.best[0]:
            selection.best = candidate
    return selection


def robust_fit(residuals: Residuals, parameters: Sequence[Parameter], *, delta: float = HUBER_DELTA,
               fixed: Mapping[str, float] | None = None, tied: Mapping[str, str] | None = None,
               accept: Callable[[dict[str, float]], bool] | None = None,
               score: Callable[[np.ndarray], float] | None = None, accept_rule: str = "its acceptance check",
               keep_rejected: bool = False, what: str = "fit") -> FitResult:
    """Minimise Σ Huber(residuals(θ)) with L-BFGS-B from every point of the grid of starts; keep the best.

    `fixed` pins parameters to values, `tied` makes a parameter equal another (free) one, e.g. {"beta": "alpha1"};
    only the remaining free parameters are optimised and gridded. θ_full = P·θ_free + offset, so the gradient
    of the objective is P^T J^T ψ(r) with the analytic Jacobian J the residual function returns.
    `accept(values)` filters converged solutions (the paper keeps 0.1 < exponents < 1); `score(residuals)` picks
    among them (default: the Huber objective). Raises UserError when no start converges to an accepted solution,
    unless `keep_rejected`: then the best converged solution `accept` rejected is returned (`accepted` == 0 says
    so), for callers that report a violated constraint rather than nothing.
    """
    space = _free_parameters(parameters, dict(fixed or {}), dict(tied or {}), what)
    objective = _huber_objective(residuals, space, delta)
    bounds = [(p.lower, p.upper) for p in space.free]
    points = len(residuals(space.full(np.array([p.starts[0] for p in space.free])))[0])
    starts = list(itertools.product(*(p.starts for p in space.free)))
    with one_blas_thread():
        outcomes = [_minimize(objective, start, bounds) for start in starts]
    selection = _select(outcomes, residuals, space, points, accept, score)
    best = selection.best if selection.best is not None or not keep_rejected else selection.best_rejected
    if best is None:
        why = (f"{selection.converged} converged but none passed {accept_rule}" if selection.converged
               else "none converged")
        raise UserError(f"{what}: no solution from {len(starts)} L-BFGS-B starts ({why}); check the data "
                        "(enough points spanning the ranges?)")
    rank, theta, value = best
    return FitResult(space.values(theta), value, float(rank), len(starts), selection.converged, selection.accepted)


def _minimize(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], start: Sequence[float],
              bounds: list[tuple[float, float]]) -> scipy.optimize.OptimizeResult | None:
    """One L-BFGS-B run; None when the start itself is not finite. Tight tolerances: the objective is O(points)
    and exact-data fits must reach the true constants to ~1e-8, which scipy's defaults stop short of."""
    x0 = np.asarray(start, dtype=np.float64)
    if not math.isfinite(objective(x0)[0]):
        return None
    return scipy.optimize.minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})


def finite_positive(what: str, **columns: ArrayLike) -> dict[str, np.ndarray]:
    """Columns as float64 1-D arrays of one length, all finite and > 0, else one UserError naming the bad one."""
    arrays = {name: np.asarray(values, dtype=np.float64).ravel() for name, values in columns.items()}
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{what}: columns have different lengths {lengths}")
    for name, values in arrays.items():
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            raise UserError(f"{what}: {name} must be finite and > 0; point {bad[0]} is {values[bad[0]]!r}")
    return arrays


def _require_points(what: str, points: int, free_parameters: int) -> None:
    if points <= free_parameters:
        raise UserError(f"{what}: {points} points cannot determine {free_parameters} free parameters; "
                        f"give at least {free_parameters + 1}")


# --- (a) power laws ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = k · x^exponent, stored as ln k (k spans dozens of orders of magnitude across the paper's laws)."""

    log_k: float
    exponent: float

    @property
    def k(self) -> float:
        return math.exp(self.log_k)

    def __call__(self, x: ArrayLike) -> np.ndarray | float:
        y = np.exp(self.log_k + self.exponent * np.log(np.asarray(x, dtype=np.float64)))
        return float(y) if np.ndim(y) == 0 else y

    def inverse(self, y: ArrayLike) -> np.ndarray | float:
        """x with k·x^exponent = y."""
        x = np.exp((np.log(np.asarray(y, dtype=np.float64)) - self.log_k) / self.exponent)
        return float(x) if np.ndim(x) == 0 else x


def fit_power_law(x: ArrayLike, y: ArrayLike, *, exponent: float | None = None, log_k: float | None = None,
                  exponent_bounds: tuple[float, float] = (-3.0, 3.0), delta: float = HUBER_DELTA,
                  what: str = "power-law fit") -> PowerLaw:
    """Huber fit of log y = log k + α log x; `exponent` or `log_k` given = held fixed.

    Approach 1 fixes α = 0.5 for N_nv and H and fits α in [0, 1] for N_v; Approach 2 fixes log k = 0 on
    log(N_v/N_v0) vs log(N_nv/N_nv0). Starts: log k on [-20, 15], α on [0, 1] (the paper's grid).
    """
    data = finite_positive(what, x=x, y=y)
    log_x, log_y = np.log(data["x"]), np.log(data["y"])
    fixed = {name: value for name, value in (("log_k", log_k), ("exponent", exponent)) if value is not None}
    _require_points(what, len(log_x), 2 - len(fixed))

    def residuals(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[0] + theta[1] * log_x - log_y, np.stack([np.ones_like(log_x), log_x], axis=1)

    low, high = exponent_bounds
    exponent_starts = tuple(s for s in (0.0, 0.25, 0.5, 0.75, 1.0) if low <= s <= high) or (0.5 * (low + high),)
    parameters = [Parameter("log_k", -100.0, 100.0, tuple(np.linspace(-20.0, 15.0, 8))),
                  Parameter("exponent", low, high, exponent_starts)]
    fit = robust_fit(residuals, parameters, delta=delta, fixed=fixed, what=what)
    return PowerLaw(fit.values["log_k"], fit.values["exponent"])


# --- (c) Chinchilla: L = E + A/N^α + B/D^β --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^α + B/D^β with N in parameters and D in tokens (raw units, as Hoffmann et al. publish)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n: ArrayLike, d: ArrayLike) -> np.ndarray | float:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        loss = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return float(loss) if np.ndim(loss) == 0 else loss

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def fit_chinchilla(n: ArrayLike, d: ArrayLike, loss: ArrayLike, *, delta: float = HUBER_DELTA) -> ChinchillaLaw:
    """Hoffmann et al.'s fit: Huber on LSE(a − α log N, b − β log D, e) − log L over a grid of starts.

    Fitted with N in 1e6 and D in 1e9 (so a, b are O(1)); A = exp(a)·1e6^α and B = exp(b)·1e9^β convert back.
    """
    what = "Chinchilla fit"
    data = finite_positive(what, N=n, D=d, loss=loss)
    log_n = np.log(data["N"] / PARAMS_UNIT)
    log_d = np.log(data["D"] / TOKENS_UNIT)
    log_loss = np.log(data["loss"])
    _require_points(what, len(log_loss), 5)

    def residuals(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=1)  # [points, 3]
        peak = terms.max(axis=1, keepdims=True)
        weights = np.exp(terms - peak)
        lse = peak[:, 0] + np.log(weights.sum(axis=1))
        share = weights / weights.sum(axis=1, keepdims=True)  # softmax: d LSE / d term
        jacobian = np.stack([share[:, 0], share[:, 1], share[:, 2], -share[:, 0] * log_n, -share[:, 1] * log_d],
                            axis=1)
        return lse - log_loss, jacobian

    parameters = [Parameter("a", -10.0, 30.0, (0.0, 2.5, 5.0)), Parameter("b", -10.0, 30.0, (0.0, 2.5, 5.0)),
                  Parameter("e", -5.0, 5.0, (-1.0, 0.0, 1.0)), Parameter("alpha", 0.0, 2.5, (0.2, 0.5, 0.8)),
                  Parameter("beta", 0.0, 2.5, (0.2, 0.5, 0.8))]
    v = robust_fit(residuals, parameters, delta=delta, what=what).values
    return ChinchillaLaw(E=math.exp(v["e"]), A=math.exp(v["a"] + v["alpha"] * math.log(PARAMS_UNIT)),
                         B=math.exp(v["b"] + v["beta"] * math.log(TOKENS_UNIT)), alpha=v["alpha"], beta=v["beta"])


# --- (b) the paper's vocabulary law: L_u = −E + A1/N_nv^α1 + A2/N_v^α2 + B/D^β ---------------------------------


@dataclasses.dataclass(frozen=True)
class VocabLossLaw:
    """Approach 3's L_u(N_nv, N_v, D); constants in NORMALISED units (N_nv, N_v in 1e6, D in 1e9 tokens).

    Calls take raw units (parameters, tokens) and normalise, so nobody has to remember that the constants only
    hold in the normalised units.
    """

    E: float
    A1: float
    A2: float
    B: float
    alpha1: float
    alpha2: float
    beta: float

    def __call__(self, n_nv: ArrayLike, n_v: ArrayLike, tokens: ArrayLike) -> np.ndarray | float:
        n = np.asarray(n_nv, dtype=np.float64) / PARAMS_UNIT
        nv = np.asarray(n_v, dtype=np.float64) / PARAMS_UNIT
        d = np.asarray(tokens, dtype=np.float64) / TOKENS_UNIT
        loss = -self.E + self.A1 / n**self.alpha1 + self.A2 / nv**self.alpha2 + self.B / d**self.beta
        return float(loss) if np.ndim(loss) == 0 else loss

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def violations(self) -> list[str]:
        """The paper's constraint broken by these constants, one line per exponent outside (0.1, 1); [] if none."""
        return exponent_violations(self.as_dict())


def exponent_violations(values: Mapping[str, float]) -> list[str]:
    """One line per exponent of the vocabulary loss law (`LAW_EXPONENTS` in `values`) outside EXPONENT_RANGE."""
    low, high = EXPONENT_RANGE
    return [f"{name}={values[name]:.4g} is outside {low:g} < {name} < {high:g}" for name in LAW_EXPONENTS
            if not low < values[name] < high]


def fit_vocab_loss(n_nv: ArrayLike, vocab_size: ArrayLike, d: ArrayLike, tokens: ArrayLike, loss: ArrayLike, *,
                   tie_beta: bool = True, delta: float = HUBER_DELTA, strict: bool = True) -> VocabLossLaw:
    """Approach 3's fit, as the paper describes it: Huber on the L_u residual, α1 = β tied, best of a grid of starts.

    Inputs in raw units (N_nv parameters, V tokens, d, D tokens). Coefficients are fitted as logs (A1 = e^a1,
    ..., E = e^e) so they stay positive; the grid is the paper's (log-coefficients {0, 2.5, 5}, e {0, 2},
    exponents {0, 0.5, 1}); only solutions with every exponent in (0.1, 1) are kept, the best by mean relative
    error |prediction − L_u| / |L_u| (fine while L_u stays away from 0, as it does: the unigram term keeps it
    around −3 to −5 nats at the paper's scales). Drop low-compute points (the paper: C < 2.18e17) first.
    `strict=False` returns the best solution even when every start breaks the exponent constraint (its
    `violations()` then name what it breaks) instead of raising UserError.
    """
    what = "vocabulary-loss fit"
    data = finite_positive(what, N_nv=n_nv, V=vocab_size, d=d, D=tokens)
    target = np.asarray(loss, dtype=np.float64).ravel()
    if target.shape != data["N_nv"].shape:
        raise UserError(f"{what}: {target.size} losses for {data['N_nv'].size} points")
    if not np.all(np.isfinite(target)):
        bad = int(np.flatnonzero(~np.isfinite(target))[0])
        raise UserError(f"{what}: loss must be finite; point {bad} is {target[bad]!r}")
    _require_points(what, len(target), 6 if tie_beta else 7)
    log_n = np.log(data["N_nv"] / PARAMS_UNIT)
    log_nv = np.log(data["V"] / VOCAB_UNIT * data["d"] / WIDTH_UNIT)
    log_d = np.log(data["D"] / TOKENS_UNIT)

    def residuals(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, a1, a2, b, alpha1, alpha2, beta = theta
        t1, t2, t3 = np.exp(a1 - alpha1 * log_n), np.exp(a2 - alpha2 * log_nv), np.exp(b - beta * log_d)
        prediction = -np.exp(e) + t1 + t2 + t3
        jacobian = np.stack([np.full_like(t1, -np.exp(e)), t1, t2, t3, -t1 * log_n, -t2 * log_nv, -t3 * log_d],
                            axis=1)
        return prediction - target, jacobian

    log_coefficient = (0.0, 2.5, 5.0)
    exponent_starts = (0.0, 0.5, 1.0)
    parameters = [Parameter("e", -5.0, 5.0, (0.0, 2.0)),
                  Parameter("a1", -10.0, 15.0, log_coefficient), Parameter("a2", -10.0, 15.0, log_coefficient),
                  Parameter("b", -10.0, 15.0, log_coefficient),
                  Parameter("alpha1", 0.0, 2.0, exponent_starts), Parameter("alpha2", 0.0, 2.0, exponent_starts),
                  Parameter("beta", 0.0, 2.0, exponent_starts)]
    scale = np.maximum(np.abs(target), 1e-12)
    low, high = EXPONENT_RANGE
    fit = robust_fit(residuals, parameters, delta=delta, tied={"beta": "alpha1"} if tie_beta else None,
                     accept=lambda v: not exponent_violations(v),
                     accept_rule=f"{low:g} < exponents < {high:g}", score=lambda r: float(np.mean(np.abs(r) / scale)),
                     keep_rejected=not strict, what=what)
    v = fit.values
    return VocabLossLaw(E=math.exp(v["e"]), A1=math.exp(v["a1"]), A2=math.exp(v["a2"]), B=math.exp(v["b"]),
                        alpha1=v["alpha1"], alpha2=v["alpha2"], beta=v["beta"])
