"""Regenerate the SST-2 sample bundled in the package from the full GLUE files.

    python scripts/make_sst2_sample.py ../shared/data/glue/sst2

Keeps a seeded random 12,000 of the 67,349 training rows (in their original order) and the
whole 872-row dev set, in the GLUE TSV layout, under 1 MB in all.
"""

import random
import sys
from pathlib import Path

N_TRAIN = 12000
SEED = 0

src = Path(sys.argv[1])
dst = Path(__file__).resolve().parents[1] / "src" / "sfedlora" / "data" / "sample" / "sst2"
dst.mkdir(parents=True, exist_ok=True)
header, *rows = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
keep = sorted(random.Random(SEED).sample(range(len(rows)), N_TRAIN))
(dst / "train.tsv").write_text(header + "".join(rows[i] for i in keep), encoding="utf-8")
(dst / "dev.tsv").write_text((src / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
