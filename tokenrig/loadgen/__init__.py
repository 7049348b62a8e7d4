"""Load generation: scenarios, request sampling, arrival plans, Locust users, per-request records."""
