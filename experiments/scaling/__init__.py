"""Scaling laws: planning sweeps and fitting Kaplan and Chinchilla laws to their results.

  plan.py           IsoFLOP and N x D sweeps: tokens from the budget under a FLOP accounting
  runs.py           reading a results table (CSV) and each run's loss curve
  laws.py           the fitted forms; compute-optimal N, D and tokens per parameter
  kaplan.py         L(N), L(D), L(C) power laws and Kaplan's joint L(N, D)
  approach1.py      Chinchilla Approach 1: envelope of the training curves
  approach2.py      Chinchilla Approach 2: IsoFLOP parabolas
  approach3.py      Chinchilla Approach 3: E + A/N^alpha + B/D^beta, Huber on log loss
  lbfgs.py          L-BFGS from thousands of starting points at once (used by approach3)
  uncertainty.py    bootstrap over runs, percentile intervals
  extrapolation.py  fit without the largest budgets, score the held-out runs
  plots.py          the figures
  fit.py            command line: fit a results table, print JSON, write the plots
  chinchilla.py     the Chinchilla reproduction on data/svg_extracted_data.csv
"""
