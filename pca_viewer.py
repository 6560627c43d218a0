"""pca_viewer.py CONFIG [--serve | --export-web OUT_DIR] [section.key=value ...] — stage 3, inspecting GEM.

Without --serve: sweeps of the first viewer.components components of every attribute from
-viewer.sigma to +viewer.sigma, as PNG strips and MP4 videos in experiments/<actor>/<run>/gem/sweeps/.
With --serve: the interactive web viewer on http://viewer.host:viewer.port (a slider per
component, orbit camera, playback of the fitted frames, export to PLY). With --export-web: a static
folder (index.html + our WebGL2 player + the compressed GEM and its coefficient tracks) that plays the
avatar in any browser, with no Python and no server (lib/viewer/web_export.py). Overrides may come
before or after the flags.
"""
import math

from lib.cli import main  # first: lib sets the OpenMP wait policy before torch loads
from lib.lock import locked
from lib.models.gem import GaussianEigenModel
from lib.paths import ActorPaths
from lib.train.distributed import evaluation_device
from lib.viewer.sweeps import identity_view, write_sweeps

import torch  # after lib (see above)


def options(parser):
    parser.add_argument("--serve", action="store_true", help="start the interactive web viewer")
    parser.add_argument("--export-web", metavar="OUT_DIR", help="write a static web player of the GEM to OUT_DIR")


def view(cfg, args):
    paths, v = ActorPaths(cfg), cfg.viewer
    if args.export_web:
        from lib.viewer.web_export import export_web

        export_web(cfg, args.export_web)
        return
    model = GaussianEigenModel.load(paths.gem, device=evaluation_device(cfg.train.device, cfg.train.threads))
    camera, R, t = identity_view(cfg)
    if args.serve:
        from lib.viewer.web import serve

        eye_gem = R[0].T @ (camera.centre - t[0])  # the identity camera, in GEM space
        fov = 2 * math.atan(camera.height / (2 * float(camera.K[1, 1])))
        serve(model, v.host, v.port, v.sliders, v.sigma, v.fps, paths.gem_exports, eye_gem.numpy(), fov)
    else:
        print(f"sweeps of {v.components} components per attribute -> {paths.gem_sweeps}")
        with locked(paths.gem_sweeps, "the sweeps folder"):
            write_sweeps(model, camera, R, t, paths.gem_sweeps, v.components, v.sigma, v.strip_steps,
                         v.video_frames, v.fps, torch.tensor(cfg.data.background, dtype=torch.float32))


if __name__ == "__main__":
    main(__doc__, view, options)
