"""Task data: loading, tokenisation and partitioning among clients.

Loading covers GLUE TSV, the hub and files; GSM8K and Alpaca for causal LMs. Nothing here
imports model or evaluation code.
"""

from .examples import CAUSAL_LM, CLASSIFICATION, REGRESSION, Examples, TaskData
from .glue import GLUE_TASKS, TaskSpec
from .lm import LM_TASKS, LMEncoded, LMExamples, encode_lm
from .loading import bundled_sst2_dir, load_task, read_glue_tsv
from .partition import dirichlet_partition, iid_partition, partition, size_partition

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "REGRESSION",
    "Examples",
    "TaskData",
    "bundled_sst2_dir",
    "load_task",
    "read_glue_tsv",
    "LM_TASKS",
    "LMEncoded",
    "LMExamples",
    "encode_lm",
    "dirichlet_partition",
    "iid_partition",
    "partition",
    "size_partition",
    "GLUE_TASKS",
    "TaskSpec",
]
