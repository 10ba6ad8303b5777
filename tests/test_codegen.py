"""The Triton kernels compiled for sm_90 on this machine (bench/codegen.py): no spills, and no 16-bit
scalar loads where grouped_mlp reads the feature map the trainer feeds it (bf16, channels-last)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def codegen(layout: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    result = subprocess.run([sys.executable, str(REPO / "bench" / "codegen.py"), "--json", "--layout", layout],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])[layout]


def test_no_kernel_spills_and_grouped_mlp_reads_the_map_with_wide_loads():
    """(bench/results/codegen_sm90.md shows the same kernels fed an NCHW view: 32 16-bit loads each in
    the layer-1 forward and dW1 kernels, which is why the op copies such a view first.)"""
    rows = codegen("channels_last")
    assert {row["op"] for row in rows} == {"grouped_mlp", "entropy_attention", "attention_pool", "attentive_entropy"}
    assert [row["kernel"] for row in rows if row["spill_bytes"]] == []
    grouped = [row for row in rows if row["op"] == "grouped_mlp"]
    assert all(row["tensor_core_mmas"] > 0 for row in grouped)
    assert all(row["half_word_loads"] == 0 for row in grouped), grouped
