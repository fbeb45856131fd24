"""Data: TFDS builders, P x K sampler, transforms and grain pipelines.

Import the submodules directly (`deml_jax.data.sampler`, `.transforms`,
`.pipeline`, `.builders`); this package imports nothing heavy, so
`import deml_jax.data` does not pull in tensorflow_datasets (~1 s).
"""
