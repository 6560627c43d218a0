"""pca_gauss.py CONFIG [section.key=value ...] — stage 3, building GEM.

Runs the trained regressor over the train + val timesteps, fits one linear basis per Gaussian
attribute in the head's space (gem.* keys: component counts, parts, fp16), prints reconstruction
errors and file sizes, scores GEM against the regressor on val and test frames, and writes
experiments/<actor>/<run>/gem/gem.pt and report.json. Meanwhile the regressor's Gaussians wait in a
scratch file in the GEM folder (timesteps x Gaussians x 44 bytes, e.g. 6.5 GB for 2,500 timesteps of
59k Gaussians), deleted at the end.
"""
from lib.cli import main
from lib.train.fit_gem import fit_gem

if __name__ == "__main__":
    main(__doc__, lambda cfg, _: fit_gem(cfg))
