"""gridattn-fx: Grid-Attention for pretrained vision transformers, as a torch.compile backend.

    compiled = torch.compile(model, backend="gridattn", options={"stride": 2})
    gm, report = gridattn_fx.rewrite(model, (images,), stride=2)
    print(gridattn_fx.last_report())
    calibration = gridattn_fx.calibrate(model.eval(), (images,), budget=0.01)   # per-site strides
    gridattn_fx.prepare(model, (images,))   # layouts for regional compilation and graph breaks
    gridattn_fx.context_parallel(model, ContextParallelConfig(ulysses_degree=2))   # diffusers, per rank
    sharding = gridattn_fx.GroupSharding(mesh, grid=(T, H, W), stride=(1, 2, 2))  # torch's context parallel
"""

from .config import GridAttnConfig, SiteOptions
from .crossgraph.declarations import ImageTokens
from .crossgraph.prepare import prepare, prepared_layouts, unprepare
from .frontends.api import capture, rewrite
from .frontends.backend import backend
from .frontends.context_parallel import context_parallel
from .frontends.group_sharding import GroupSharding
from .grid import TokenLayout, cluster, grid_mask, grouped_attention, masked_attention, recover
from .report import Report, SiteReport, last_report, report_history
from .tools.calibrate import Calibration, calibrate

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "GridAttnConfig",
    "GroupSharding",
    "ImageTokens",
    "Report",
    "SiteOptions",
    "SiteReport",
    "TokenLayout",
    "backend",
    "calibrate",
    "capture",
    "context_parallel",
    "cluster",
    "grid_mask",
    "grouped_attention",
    "last_report",
    "masked_attention",
    "prepare",
    "prepared_layouts",
    "recover",
    "report_history",
    "rewrite",
    "unprepare",
]
