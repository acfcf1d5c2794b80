#!/usr/bin/env bash
# The README's main job, from a fresh machine: set-up, the full-size demo model
# repository (built once), sample studies (generated once), then the embedded batch
# over them on ONNX Runtime. Writes output/output.xlsx.
# Usage: scripts/demo.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DISABLE_TELEMETRY=1  # onnxruntime >= 1.31 sends telemetry otherwise
output_dir="${1:-output}"
repository="model_repository_running"

bash scripts/setup.sh convert,dev

if [ ! -f "$repository/chest_screening/metadata.json" ]; then
  echo "[demo] building the full-size DEMO model repository (seeded weights; a few minutes, once)"
  .venv/bin/python -m convertation.build_repository --output "$repository" --flavour python --demo
fi

if [ ! -d samples ]; then
  echo "[demo] generating sample studies into samples/"
  .venv/bin/python -m synthetic.sample_studies samples
fi

.venv/bin/python -m services.batch samples "$output_dir" --model-repository "$repository"
echo "[demo] report: $output_dir/output.xlsx (warnings: $output_dir/warnings_and_errors.txt)"
