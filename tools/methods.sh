#!/usr/bin/env bash
# Regenerates the README's "Training methods" comparison on the bundled dataset (about 75 min on 2 cores
# once the two demo runs exist). Each method is the demo config with one option changed, trained at
# β = 0.1, 1, 3 (image-codec baselines skipped), and compared with `mtfc compare` on those β:
#
#   plain recipe = the demo with the legacy `es` encoder and plain detection heads  (runs/demo-es, 5 β)
#   head-kd      = plain + distilled detection (Chen et al.) and segmentation (NFD) heads, on plain's codecs
#   saliency     = plain + bottleneck.saliency 0.5 (stage 1 and every head retrained)
#   light        = plain with the `light` encoder: the demo's codecs, cls/seg heads, plain detection heads
#   taps         = the demo (light + distilled detection) + bottleneck.select_taps 2, against the demo
#
# Runs share what a method does not change by linking it from the run it is compared with (the
# teacher and reference models always; the codecs and untouched heads where only heads change).
#   bash tools/methods.sh [METHOD ...]      default: every method
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mtfc=".venv/bin/mtfc"
plain=(--set bottleneck.codec.encoder=es --set heads.detection.distill=false)
three=(--set "bottleneck.betas=[0.1,1.0,3.0]" --set "evaluation.baselines={}")

link() {  # link DIR's PATHS from run FROM (relative links inside runs/)
  local dir=$1 from=$2; shift 2
  for p in "$@"; do
    mkdir -p "$(dirname "$dir/$p")"
    ln -sfn "$(realpath --relative-to="$(dirname "$dir/$p")" "$from/$p")" "$dir/$p"
  done
}
compare() { $mtfc compare "$1/report/results.json" "$2/report/results.json" --names "$3" "$4" --out "$2/compare.json"; }

[ -f runs/demo-es/report/results.json ] || $mtfc run configs/demo-per-beta.yaml --set out_dir=runs/demo-es "${plain[@]}"
[ -f runs/demo-per-beta/report/results.json ] || $mtfc run configs/demo-per-beta.yaml

for method in "${@:-head-kd saliency light taps}"; do for m in $method; do
  out=runs/cmp/$m
  mkdir -p "$out"
  case $m in
    head-kd)
      link "$out" runs/demo-es teacher reference bottleneck heads/beta_0.1/classification \
        heads/beta_1/classification heads/beta_3/classification
      $mtfc run configs/demo-per-beta.yaml --set out_dir=$out "${plain[@]}" "${three[@]}" \
        --set heads.detection.distill=true --set heads.segmentation.distill=true
      compare runs/demo-es "$out" plain head-kd ;;
    saliency)
      link "$out" runs/demo-es teacher reference
      $mtfc run configs/demo-per-beta.yaml --set out_dir=$out "${plain[@]}" "${three[@]}" --set bottleneck.saliency=0.5
      compare runs/demo-es "$out" plain saliency ;;
    light)
      link "$out" runs/demo-per-beta teacher reference bottleneck
      for b in 0.1 1 3; do link "$out" runs/demo-per-beta heads/beta_$b/classification heads/beta_$b/segmentation; done
      $mtfc run configs/demo-per-beta.yaml --set out_dir=$out "${three[@]}" --set heads.detection.distill=false
      compare runs/demo-es "$out" es light ;;
    taps)
      link "$out" runs/demo-per-beta teacher reference
      $mtfc run configs/demo-per-beta.yaml --set out_dir=$out "${three[@]}" --set bottleneck.select_taps=2
      compare runs/demo-per-beta "$out" demo taps ;;
    *) echo "unknown method $m (head-kd, saliency, light, taps)" >&2; exit 2 ;;
  esac
done; done
