"""The model fetcher: the init container that puts verified model files into a WebUI pod's model cache.

`manifest` describes what to fetch, `sources` streams a file from http(s), S3 or a mounted volume,
`safetensors_check` validates a .safetensors header without loading tensors, and `fetcher` ties them
together (locking, resuming, verifying, the `sd-operator fetch-model` command).
"""
