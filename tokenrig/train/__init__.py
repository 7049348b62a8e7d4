"""Training throughput: pre-training, LoRA and QLoRA under DeepSpeed ZeRO, with MFU and a module breakdown.

spec (settings) -> dsconfig (DeepSpeed config) -> session (launcher, live records, summary) ->
worker (one rank: model, engine, steps, profile) -> records / summary / breakdown / exporter;
matrix reruns a grid of specs into one comparison table.
"""
