#!/usr/bin/env bash
# Debian packages the pipeline uses, installed only when missing:
#   tesseract-ocr (+eng, chi-sim)  OCR for the fine-structure text benchmark
#   fonts-wqy-microhei             a CJK font, so the rendered text set includes Chinese
# Without root (or apt), print what is missing and carry on: the tests that need these
# skip with a reason, the pipeline still runs (English text only, OCR metrics reported
# as unavailable).
set -euo pipefail

missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr tesseract-ocr-eng)
if command -v tesseract >/dev/null 2>&1 && ! tesseract --list-langs 2>/dev/null | grep -qx chi_sim; then
  missing+=(tesseract-ocr-chi-sim)
elif ! command -v tesseract >/dev/null 2>&1; then
  missing+=(tesseract-ocr-chi-sim)
fi
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: missing Debian packages (install them for OCR / Chinese text): ${missing[*]}" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
