"""An independent NumPy float64 implementation of the paper's algorithm, for checking memel.

Written from the formulas in the issue (Lemma 3.2, Algorithm 1, Definition 3.1), not from
memel's code: batches are processed one at a time; MS uses the history before the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PaperStatistics:
    forget_steps: int
    eps: float = 0.01
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    count: np.ndarray | None = None
    batches: int = 0
    history: list[np.ndarray] = field(default_factory=list)

    def ms(self, samples: np.ndarray) -> np.ndarray:
        """phi for a [samples, neurons] array against the current history."""
        assert self.mean is not None and self.var is not None
        denominator = self.var + self.eps * self.var.mean()
        return (samples - self.mean) ** 2 / denominator

    def update(self, samples: np.ndarray) -> None:
        x = samples.astype(np.float64)
        b = x.shape[0]
        mu_b = x.mean(axis=0)
        nu_b = x.var(axis=0)  # biased batch variance
        if self.batches == 0:
            self.mean = mu_b
            self.var = x.var(axis=0, ddof=1) if b > 1 else np.zeros_like(mu_b)
            self.count = np.full(x.shape[1], b)
        elif self.batches < self.forget_steps:
            m = self.count.astype(np.float64)
            mu, nu = self.mean, self.var
            new_mu = (m * mu + b * mu_b) / (m + b)
            new_nu = m * b * (mu - mu_b) ** 2 / ((m + b - 1) * (m + b)) + (b * nu_b + (m - 1) * nu) / (m + b - 1)
            self.mean, self.var = new_mu, new_nu
            self.count = self.count + b
        else:
            nf = self.forget_steps
            mu, nu = self.mean, self.var
            new_mu = (nf * mu + mu_b) / (nf + 1)
            new_nu = nf * (mu - mu_b) ** 2 / ((nf + 1 - 1 / b) * (nf + 1)) + (nu_b + (nf - 1 / b) * nu) / (
                nf + 1 - 1 / b
            )
            self.mean, self.var = new_mu, new_nu
            self.count = self.count + b
        self.batches += 1


def top_n(phi: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the n largest values in each row."""
    return np.sort(np.argsort(-phi, axis=1, kind="stable")[:, :n], axis=1)
