"""Task data: loading (GLUE TSV, hub, files; GSM8K and Alpaca for causal LMs), tokenisation and partitioning among clients."""

from .lm import CAUSAL_LM, LM_TASKS, LMEncoded, LMExamples, encode_lm
from .loading import Examples, TaskData, bundled_sst2_dir, load_task, read_glue_tsv
from .partition import dirichlet_partition, iid_partition, label_histograms, partition, size_partition
from .tasks import GLUE_TASKS, TaskSpec

__all__ = [
    "Examples",
    "TaskData",
    "bundled_sst2_dir",
    "load_task",
    "read_glue_tsv",
    "CAUSAL_LM",
    "LM_TASKS",
    "LMEncoded",
    "LMExamples",
    "encode_lm",
    "dirichlet_partition",
    "iid_partition",
    "label_histograms",
    "partition",
    "size_partition",
    "GLUE_TASKS",
    "TaskSpec",
]
