"""The captioning pipeline, free of HTTP: options, errors, cache, batcher, runtime.

Every caller — the analyze and batch routes, the job worker, the folder CLI, a Ray actor — turns
its input into an `image_input.ImageSource` and calls `Pipeline.caption` (see pipeline.py).
Importing this package is cheap: nothing heavy loads until a model does.
"""
