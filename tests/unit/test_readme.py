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


def test_readme_moh_example_runs():
    section = README.read_text().split("## MoH:", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (1, 2048, 768) and namespace["moh"].last_usage.shape == (10,)
    x = namespace["x"][:, :16]
    with __import__("torch").no_grad():
        a = namespace["same"](x)[0]
        b = namespace["mha"](x, x, x)[0]
    assert (a - b).abs().max() < 1e-5


def test_readme_dha_example_runs():
    section = README.read_text().split("## DHA:", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    heads = namespace["plan"].heads()
    assert sum(n for layer in heads.values() for n in layer.values()) == 16  # 25 % of 4 x (8 + 8)
    assert len(namespace["attn"].config.k_map) == 8
