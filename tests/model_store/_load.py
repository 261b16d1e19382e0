"""Load one model in a fresh process and print what was served: the 'second process start'."""

import json
import logging
import sys
import time

t0 = time.perf_counter()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

from model_store import ModelStore, StoreError  # noqa: E402
from model_store.quality import EvalSettings  # noqa: E402

home, source, task, variant = sys.argv[1:5]
small = EvalSettings(ppl_tokens=256, ppl_chunk=128, decode_steps=4, encoder_rounds=2,
                         bench_min_trial_s=0.02, bench_max_rounds=6, bench_cap_s=5.0)
try:
    art = ModelStore(home, eval_settings=small if "--small" in sys.argv else None).load(source, task, variant)
except StoreError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(2)
print(json.dumps({"variant": art.variant, "path": str(art.path), "quality": art.quality, "format": art.format,
                  "seconds": time.perf_counter() - t0}))
