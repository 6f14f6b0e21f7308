"""Pure ML: data, search space, objective, fit, evaluate, plots. No web and no database code."""
