"""Networks: definitions, training on simulated data, export, inference backends."""
