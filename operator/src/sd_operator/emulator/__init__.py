"""sd-emulator: a stand-in for the AUTOMATIC1111 WebUI HTTP API, for tests, local runs and benchmarks.

It is NOT a Stable Diffusion implementation. It accepts the command line the operator renders for
the real WebUI (`--api --nowebui --ckpt ... --freeze-settings ...`), serves the one checkpoint given
with `--ckpt`, and answers the `/sdapi/v1/*` and `/controlnet/*` routes with A1111's shapes: one
generation at a time under a queue lock, timing from a GPU profile (`profiles.py`), OOM beyond the
profile's VRAM, real PNGs whose pixels and text chunks are a deterministic function of the model,
seed and prompt (`images.py`). Start it with `sd-operator emulator ...` or
`python -m sd_operator.emulator.cli ...`; `GET /emulator/stats` reports what it saw.
"""

EMULATOR_NAME = "sd-emulator"
