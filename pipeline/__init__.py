"""fishpipe: a DVC + MLflow pipeline for Kaggle image competitions, built first for the fisheries task.

The package has four layers, and imports only go downwards. `pipeline.stages` holds one module per DVC
stage (ingest, augment, train, ensemble, submit, score, and the course cases mnist, catsdogs, imdb); each has
a `Settings` dataclass naming the params.yaml sections it reads, a `run(settings)` that does the work and a
short `main(argv)`, and no stage imports another. `pipeline.core` is what the stages share: the typed
params (`params`), the competition's fixed facts (`competition`), file formats (`manifest`, `predictions`,
`submission`, `files`), the maths (`metrics`, `folds`, `calibration`, `ensembling`, `boat_groups`), the
models (`backbones`, `heads`, `devices`, `augmentation`, `batches`), the input side (`sources`,
`archives`, `decode`) and the MLflow side (`tracking`, `serving`). `pipeline.tools` are commands a user
runs by hand and DVC never does (download, upload, validate, ui, candidate_leaderboard, readme_tables).
`pipeline.generators` are the offline demo sources that stand in for downloads (the fisheries demo, run by
dvc.yaml's `demo` stage, and the course cases' digits, cartoons and reviews). `python -m pipeline <command>`
runs any stage or tool (`__main__`); docs/ARCHITECTURE.md has the same map with the file formats between the
stages.
"""
