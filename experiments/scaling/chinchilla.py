"""Chinchilla reproduction: Approach 3 on the points of Hoffmann et al. (2022), Figure 4.

    python -m experiments.scaling.chinchilla

Data: data/svg_extracted_data.csv (Epoch AI's extraction, see data/README.md); tokens
D = C / (6N); the 5 highest-loss rows are dropped as in Epoch AI's analysis (240 runs).
Prints the fitted E, A, B, alpha, beta, a, b next to the published values and the fit's
objective at each, then why they differ (`DIFFERENCES`). The same fit from the command
line, with plots: `python -m experiments.scaling.fit --input
experiments/scaling/data/svg_extracted_data.csv --n-col "Model Size" --c-col
"Training FLOP" --loss-col loss --exclude-top-loss 5 --approach 3 --plots-dir DIR`.

Measured on the 2-core CPU at eca7335: E 1.8172, A 477.83, B 2143.4, alpha 0.34731, beta
0.36717 (a 0.5139, b 0.4861), objective 1.01827e-3, reached by 1,218 of the 4,500 starts;
3.4 s per fit, 0.9 s of it compilation (the README gives the whole command's time).
scipy's L-BFGS-B from the same 4,500 starts, one at a time, reaches the same optimum.
"""

from __future__ import annotations

import pathlib
import time

from experiments.scaling import approach3
from experiments.scaling.laws import EPOCH_2024, HOFFMANN_2022
from experiments.scaling.runs import load_runs

DATA = pathlib.Path(__file__).parent / "data" / "svg_extracted_data.csv"
CHINCHILLA_FLOPS = 5.76e23  # Chinchilla's (and Gopher's) training budget

DIFFERENCES = """\
Why the numbers differ
- From Hoffmann et al.: the published parameters fit these points about 4x worse than the
  optimum (objective above), so they are not this objective's minimum on this data; Epoch
  AI (Besiroglu et al. 2024) suggest the original optimizer stopped before converging.
  Consistent with that: averaging instead of summing the Huber terms, with scipy's default
  tolerances (which are absolute for an objective below 1), stopped at a = 0.45,
  b = 0.55 in our check on 300 of the 4,500 starts, near the published a = 0.46,
  b = 0.54. The digitized points also differ slightly from the runs Hoffmann et al. fitted.
- From Epoch AI: E, A, alpha and beta agree to rounding; B is 3% higher. scipy's
  L-BFGS-B from the same 4,500 starts lands on our optimum (B = 2143.4), and the objective
  at Epoch's published (rounded) values is higher than at ours, so the gap is not our
  optimizer's. B is the least determined parameter: B and beta trade off along a shallow
  valley (B / D^beta barely changes when both move together), and its bootstrap 95%
  interval spans about 1,200 to 7,200 (`fit --bootstrap 100`).
- The refit implies a ~ b ~ 0.5 and about 20 tokens per parameter, in line with the
  paper's Approaches 1 and 2; the published Approach 3 values (a = 0.46) do not."""


def main() -> None:
    runs = load_runs(DATA, n_col="Model Size", c_col="Training FLOP", loss_col="loss").without_highest_loss(5)
    data = runs.n_params, runs.tokens, runs.loss
    t0 = time.perf_counter()
    fit = approach3.fit_approach3(*data)
    first_call = time.perf_counter() - t0
    fit_again = approach3.fit_approach3(*data)  # compiled now
    laws = {"this fit": fit.law, "Hoffmann 2022": HOFFMANN_2022, "Epoch AI 2024": EPOCH_2024}
    print(f"Approach 3 on {len(runs.loss)} runs (5 highest-loss of {len(runs.loss) + 5} dropped), "
          f"{fit.n_starts} L-BFGS starts in float64")
    print(f"fit time: {first_call:.1f} s including compilation, {fit_again.seconds:.1f} s compiled; "
          f"{fit.n_at_best} starts reached the best objective\n")
    print(f"{'':>14}" + "".join(f"{name:>16}" for name in laws))
    rows = {name: [law.as_dict()[name] for law in laws.values()] for name in ("E", "A", "B", "alpha", "beta", "a", "b")}
    rows["objective"] = [approach3.objective(law, *data) for law in laws.values()]
    rows[f"D/N at {CHINCHILLA_FLOPS:.2g}"] = [float(law.tokens_per_param(CHINCHILLA_FLOPS)) for law in laws.values()]
    for name, values in rows.items():
        print(f"{name:>14}" + "".join(f"{v:>16.5g}" for v in values))
    print("\n" + DIFFERENCES)


if __name__ == "__main__":
    main()
