"""The README's layer-contract example runs as written (the swap/prune examples need real
checkpoints and calibration data; tests/integration/test_hosts_real.py runs those steps)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_layer_contract_example_runs():
    section = README.read_text().split("## The layer contract", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (2, 128, 768)
    assert namespace["gqa"].num_heads == 6
