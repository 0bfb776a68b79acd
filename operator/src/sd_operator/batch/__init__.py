"""`sd-operator batch`: renders a GenerationBatch through the services layer, resumably, with progress.

items.py turns the spec (inline items, a JSON Lines file, a sweep) into numbered tasks; payload.py turns
a task into an A1111 txt2img body; output.py names and writes images and sidecars (a folder or S3);
report.py rate-limits progress into the status; runner.py sends the work; cli.py is the command line.
"""
