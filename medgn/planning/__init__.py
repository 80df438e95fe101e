"""Planning: the dataset fingerprint, the planner, the run's plan section and cross-validation splits."""
