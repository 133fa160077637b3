"""The functional forms the fits produce, and what they imply for compute-optimal training.

Symbols: N parameters, D training tokens, C training FLOPs, L loss (nats/token).
Compute-optimal allocation assumes C = 6 N D, as Hoffmann et al. (2022) do; whichever
accounting the data used for N and C carries over into the fitted coefficients.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params, tokens):
        n_params, tokens = np.asarray(n_params, float), np.asarray(tokens, float)
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    @property
    def a(self) -> float:
        """N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, flops):
        """(N_opt, D_opt) minimizing L under 6 N D = C: N_opt = G (C/6)^a, D_opt = (C/6)^b / G
        (Hoffmann et al. eq. 4)."""
        per_6 = np.asarray(flops, float) / 6.0
        return self.G * per_6**self.a, per_6**self.b / self.G

    def tokens_per_param(self, flops):
        n_opt, d_opt = self.compute_optimal(flops)
        return d_opt / n_opt

    def as_dict(self) -> dict[str, float]:
        fields = _float_fields(self)
        return {**fields, "a": self.a, "b": self.b}


# Published fits to compare with: Hoffmann et al. 2022 (Approach 3, section 3.3) and the
# refit by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") on the
# Figure 4 points in data/.
HOFFMANN_2022 = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH_2024 = ChinchillaLaw(E=1.82, A=482.0, B=2085.4, alpha=0.348, beta=0.366)


@dataclasses.dataclass(frozen=True)
class AllocationLaw:
    """N_opt = n_coef C^a and D_opt = d_coef C^b: the power laws of Approaches 1 and 2."""

    a: float
    b: float
    n_coef: float
    d_coef: float

    def compute_optimal(self, flops):
        flops = np.asarray(flops, float)
        return self.n_coef * flops**self.a, self.d_coef * flops**self.b

    def tokens_per_param(self, flops):
        n_opt, d_opt = self.compute_optimal(flops)
        return d_opt / n_opt

    def as_dict(self) -> dict[str, float]:
        return _float_fields(self)


def fit_allocation_law(flops, n_opt, d_opt) -> AllocationLaw:
    """Least-squares lines through log N_opt and log D_opt against log C."""
    log_c = np.log(np.asarray(flops, float))
    a, log_n_coef = np.polyfit(log_c, np.log(n_opt), 1)
    b, log_d_coef = np.polyfit(log_c, np.log(d_opt), 1)
    return AllocationLaw(a=float(a), b=float(b), n_coef=float(np.exp(log_n_coef)), d_coef=float(np.exp(log_d_coef)))


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = irreducible + (scale / x)^exponent: Kaplan et al.'s L(N), L(D), L(C) forms."""

    scale: float
    exponent: float
    irreducible: float = 0.0

    def loss(self, x):
        return self.irreducible + (self.scale / np.asarray(x, float)) ** self.exponent

    def as_dict(self) -> dict[str, float]:
        return _float_fields(self)


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, eq. 1.5).

    Its limits are L(N) = (N_c / N)^alpha_N as D grows and L(D) = (D_c / D)^alpha_D as N grows.
    """

    n_c: float
    d_c: float
    alpha_n: float
    alpha_d: float

    def loss(self, n_params, tokens):
        n_params, tokens = np.asarray(n_params, float), np.asarray(tokens, float)
        return ((self.n_c / n_params) ** (self.alpha_n / self.alpha_d) + self.d_c / tokens) ** self.alpha_d

    def as_dict(self) -> dict[str, float]:
        return _float_fields(self)


def _float_fields(law) -> dict[str, float]:
    return {f.name: float(getattr(law, f.name)) for f in dataclasses.fields(law)}
