"""The metrics core: request records, the metric registry, step summaries, SLOs and a step's verdict.

Load generation, reports, capacity planning and monitoring all read and write these; the core imports none
of them.
"""
