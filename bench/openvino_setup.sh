#!/usr/bin/env bash
# The venv that `bench/offline.py --openvino-python VENV/bin/python` runs OpenVINO GenAI in
# (docs/openvino-and-isa.md). torch goes in first and stays pinned by a constraints file:
# optimum-intel would otherwise pull a CUDA torch.
#
#     bash bench/openvino_setup.sh [VENV]      # default bench/results/openvino-venv (ignored)
set -euo pipefail
VENV=${1:-bench/results/openvino-venv}
TORCH=${TORCH:-2.13.0}
python3 -m venv "$VENV"
echo "torch==$TORCH" > "$VENV/constraints.txt"
"$VENV/bin/pip" install -q "torch==$TORCH"
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" \
    openvino openvino-genai openvino-tokenizers "optimum-intel[openvino]"
# optimum-intel also brings a torchvision whose operators don't load with this torch, and
# transformers then fails to import; exporting GPT-2 needs no torchvision.
"$VENV/bin/pip" uninstall -q -y torchvision
"$VENV/bin/python" -c "import openvino, openvino_genai, optimum.intel, transformers.modeling_utils
print('openvino', openvino.__version__, '| genai', openvino_genai.__version__)"
echo "then: python bench/offline.py --openvino-python $VENV/bin/python"
