"""pca_viewer.py CONFIG [--serve] [section.key=value ...] — stage 3, inspecting GEM.

Without --serve: sweeps of the first viewer.components components of every attribute from
-viewer.sigma to +viewer.sigma, as PNG strips and MP4 videos in experiments/<actor>/gem/sweeps/.
With --serve: the interactive web viewer on http://viewer.host:viewer.port (a slider per
component, orbit camera, playback of the fitted frames, export to PLY).
"""
import math
import sys

import torch

from lib.cli import parse
from lib.models.gem import GaussianEigenModel, GemError
from lib.paths import ActorPaths
from lib.train.distributed import evaluation_device
from lib.viewer.sweeps import identity_view, write_sweeps


def options(parser):
    parser.add_argument("--serve", action="store_true", help="start the interactive web viewer")


if __name__ == "__main__":
    cfg, args = parse(__doc__, options)
    paths, v = ActorPaths(cfg), cfg.viewer
    device = evaluation_device(cfg.train.device, cfg.train.threads)
    try:
        model = GaussianEigenModel.load(paths.gem, device=device)
    except GemError as e:
        sys.exit(f"error: {e}")
    camera, R, t = identity_view(cfg)
    if args.serve:
        from lib.viewer.web import serve

        eye_gem = R[0].T @ (camera.centre - t[0])  # the identity camera, in GEM space
        fov = 2 * math.atan(camera.height / (2 * float(camera.K[1, 1])))
        serve(model, v.host, v.port, v.sliders, v.sigma, v.fps, paths.gem_exports, eye_gem.numpy(), fov)
    else:
        print(f"sweeps of {v.components} components per attribute -> {paths.gem_sweeps}")
        write_sweeps(model, camera, R, t, paths.gem_sweeps, v.components, v.sigma, v.strip_steps,
                     v.video_frames, v.fps, torch.tensor(cfg.data.background, dtype=torch.float32))
