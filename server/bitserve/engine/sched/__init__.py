"""Generation scheduling: the pure admission policy and the step loop."""
