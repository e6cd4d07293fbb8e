"""Task data: loading (GLUE TSV, hub, files), tokenisation and partitioning among clients."""

from .loading import Examples, TaskData, bundled_sst2_dir, load_task, read_glue_tsv
from .partition import dirichlet_partition, iid_partition, label_histograms, partition
from .tasks import GLUE_TASKS, TaskSpec

__all__ = [
    "Examples", "TaskData", "bundled_sst2_dir", "load_task", "read_glue_tsv",
    "dirichlet_partition", "iid_partition", "label_histograms", "partition",
    "GLUE_TASKS", "TaskSpec",
]
