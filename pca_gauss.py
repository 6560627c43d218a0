"""pca_gauss.py CONFIG [section.key=value ...] — stage 3, building GEM.

Runs the trained regressor over the train + val timesteps, fits one linear basis per Gaussian
attribute in the head's space (gem.* keys: component counts, parts, fp16), prints reconstruction
errors and file sizes, scores GEM against the regressor on val and test frames, and writes
experiments/<actor>/<run>/gem/gem.pt and report.json.
"""
from lib.cli import main
from lib.train.fit_gem import fit_gem

if __name__ == "__main__":
    main(__doc__, lambda cfg, _: fit_gem(cfg))
