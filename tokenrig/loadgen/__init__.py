"""Load generation: scenarios, request sampling, arrival plans, Locust users, the load walks over steps."""
