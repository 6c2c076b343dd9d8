"""The router's complexity classifier: features, model, calibration, routing policy and RouteLLM metrics."""
