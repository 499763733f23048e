import torch

import headmods
from headmods.bench import compare, peak_memory_mb
from headmods.cli import main


def test_create_and_list_variants():
    assert "mha" in headmods.list_variants()
    layer = headmods.create("mha", 32, 4, num_kv_heads=2)
    assert isinstance(layer, headmods.MultiHeadAttention) and layer.num_kv_heads == 2
    assert headmods.get_variant("mha") is headmods.MultiHeadAttention
    assert headmods.MultiHeadAttention.variant == "mha"


def test_register_a_third_party_variant():
    class Doubled(headmods.MultiHeadAttention):
        def core(self, *args, **kwargs):
            out, w = super().core(*args, **kwargs)
            return 2 * out, w

    headmods.register_variant("test_doubled")(Doubled)
    try:
        layer = headmods.create("test_doubled", 16, 2, batch_first=True)
        ref = headmods.MultiHeadAttention.from_config(layer.config)
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(1, 3, 16)
        torch.testing.assert_close(layer(x)[0], 2 * ref(x)[0])
    finally:
        from headmods import registry

        registry._VARIANTS.pop("test_doubled")


def test_collect_aux_losses_sums_layers_that_have_one():
    model = torch.nn.Sequential(headmods.MultiHeadAttention(8, 2), headmods.MultiHeadAttention(8, 2))
    assert headmods.collect_aux_losses(model) is None
    model[0].aux_loss = torch.tensor(0.5)
    model[1].aux_loss = torch.tensor(0.25)
    assert float(headmods.collect_aux_losses(model)) == 0.75


def test_compare_measures_ratios_in_one_process():
    x = torch.randn(128, 128)
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1
        return x @ x

    def b():
        calls["b"] += 1
        return (x @ x) @ x

    threads_before = torch.get_num_threads()
    res = compare({"a": a, "b": b}, warmup=1, rounds=4, threads=1, memory=False)
    assert res.threads == 1 and torch.get_num_threads() == threads_before
    assert calls == {"a": 5, "b": 5}
    assert res.baseline == "a" and res.ratio("a") == 1.0
    assert len(res.times["b"]) == 4 and res.ratio("b") > 0
    table = res.to_markdown()
    assert "| b |" in table and "ratio vs a" in table


def test_peak_memory_sees_a_large_temporary():
    mb = peak_memory_mb(lambda: torch.ones(64, 2**20 // 4).sum())  # a 64 MB temporary
    if mb is not None:  # None only where /proc is unavailable
        assert mb >= 60


def test_cli_ls_and_bench_variant(capsys):
    assert main(["ls"]) == 0
    assert "mha" in capsys.readouterr().out.split()
    assert main(["bench", "--variant", "mha", "--embed-dim", "32", "--num-heads", "4", "--num-kv-heads", "2",
                 "--batch", "2", "--seq-len", "16", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| mha (SDPA baseline) |" in out and "| mha |" in out and "(2, 16, 32)" in out


def test_cli_reports_bad_options_in_one_line(capsys):
    assert main(["bench", "--variant", "mha", "--embed-dim", "30", "--num-heads", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_heads (4) must divide embed_dim (30)" in err
