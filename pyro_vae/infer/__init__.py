"""log w from the model's and guide's traces, the ELBO estimators built on it, closed-form KLs."""
