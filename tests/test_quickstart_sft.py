"""The quickstart's SFT leg (`--sft-only`), wired end to end on a tiny dense LLaMA with the embedded SmolLM2 tokenizer
and chat template (the real leg on SmolLM2-135M: `megamoe-quickstart --sft-only`): chat set built, dense and
converted MoE measured on held-out replies, two SFT stages, chat replies before and after."""

import json

from test_quickstart import write_tiny_dense


def test_quickstart_sft_only(tmp_path, smollm2_dir):
    from megamoe.quickstart import main
    dense = write_tiny_dense(tmp_path / "dense", smollm2_dir)
    out = tmp_path / "qs"
    rc = main(["--hf-dir", str(dense), "--out", str(out), "--sft-only", "--sft-steps", "3", "--sft-batch", "2",
               "--sft-seq-len", "128", "--sft-conversations", "60", "--sft-lr", "1e-2", "--eval-batches", "1",
               "--experts", "4"])
    assert rc == 0
    s = json.load(open(out / "quickstart_summary.json"))["sft"]
    assert list(s["loss"]) == ["dense", "MoE before", "MoE after general", "MoE after math_replay"]
    for res in s["loss"].values():
        assert set(res) == {"general", "math"} and all(r["tokens"] > 0 for r in res.values())
    assert sorted(s["losses"], key=int) == [str(i) for i in range(1, 7)] or sorted(map(int, s["losses"])) == \
        list(range(1, 7))
    steps = sorted({(x["step"], x["domain"]) for x in s["samples"]})
    assert steps == [(0, "general"), (0, "math"), (3, "general"), (3, "math"), (6, "general"), (6, "math")]
    assert all(x["prompt"].endswith("<|im_start|>assistant\n") for x in s["samples"])
    # 6 steps at lr 1e-2 on a random tiny model: the held-out response loss falls on both domains
    before, after = s["loss"]["MoE before"], s["loss"]["MoE after math_replay"]
    assert all(after[d]["loss"] < before[d]["loss"] for d in before)
