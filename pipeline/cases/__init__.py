"""The course's study cases as small pipelines: MNIST (MLP and CNN), cats vs dogs, IMDB sentiment.

Each case is one stage module (`python -m pipeline.cases.<case>`) that reads its own section of params.yaml,
loads a source (a real download or an offline `demo`), trains, and writes `reports/<case>/`. They share the
fisheries pipeline's core (config, backbone registry, training loop, tracking) rather than copying it.
"""
