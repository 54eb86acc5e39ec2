"""A tiny shop: the business row each benchmarked transaction writes."""
