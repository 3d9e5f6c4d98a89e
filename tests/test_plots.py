"""Pictures of ``qwen_cls.plots``: Chinese text renders with the packaged font, the token strip and the LoRA
picture show the right roles and counts, and legends stay clear of the data."""

from __future__ import annotations

import importlib.metadata
import io
import logging
import warnings
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib import font_manager  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from qwen_cls import fonts, plots  # noqa: E402


class FakeTokenizer:
    """Decodes ids 1..n to fixed strings; 0 is padding."""

    pad_token_id = 0
    vocab = {0: "<pad>", 1: "<|im_start|>", 2: "user", 3: "\n", 4: "体育新闻", 5: " candidates", 6: "体",
             7: "育", 8: "<|im_end|>"}

    def decode(self, ids):
        return "".join(self.vocab.get(i, f"tok{i}") for i in ids)


PROMPT, ANSWER, PADS = [1, 2, 3, 4, 5], [6, 7, 8], [0, 0]
ROW = {"input_ids": PROMPT + ANSWER + PADS, "labels": [-100] * 5 + ANSWER + [-100] * 2,
       "attention_mask": [1] * 8 + [0] * 2}


def _package_font() -> Path:
    dist = importlib.metadata.distribution("pylopdf-fonts-zh-cn")
    [entry] = [f for f in dist.files if f.name == fonts.CJK_FONT_FILE]
    return Path(dist.locate_file(entry)).resolve()


def test_cjk_font_comes_from_the_installed_package():
    assert fonts.cjk_font_path().resolve() == _package_font()
    assert plots.CJK_FONT_FAMILY == "Noto Sans SC"
    assert matplotlib.rcParams["font.sans-serif"][:2] == ["Noto Sans SC", "DejaVu Sans"]


def test_chinese_title_saves_without_glyph_warning_or_findfont_message(caplog, tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2], label="训练 loss")
    ax.set_title("训练损失 (loss) 与准确率 −0.5 ↵")  # "↵" is not in Noto Sans SC: DejaVu Sans draws it
    ax.set_xlabel("步数 (step)", style="italic")
    ax.legend()
    with caplog.at_level(logging.INFO, logger="matplotlib"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
        plots.save_figure(fig, tmp_path / "title.png")
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Glyph" in m or "findfont" in m or "missing" in m], messages
    used = font_manager.fontManager._find_fonts_by_props(ax.title.get_fontproperties())
    assert Path(used[0]).resolve() == _package_font()  # the first font tried for the title is the package's
    plt.close(fig)


def test_token_roles_of_a_hand_made_row():
    roles = plots.token_roles(ROW["input_ids"], ROW["labels"], attention_mask=ROW["attention_mask"])
    assert roles == ["prompt"] * 5 + ["answer"] * 3 + ["padding"] * 2
    # without an attention mask, the pad id with label -100 is padding
    assert plots.token_roles(ROW["input_ids"], ROW["labels"], pad_token_id=0) == roles
    with pytest.raises(ValueError):
        plots.token_roles([1, 2], [-100])


def test_token_strip_colours_counts_and_labels(tmp_path):
    import torch

    fig = plots.token_strip(torch.tensor(ROW["input_ids"]), torch.tensor(ROW["labels"]), FakeTokenizer(),
                            attention_mask=torch.tensor(ROW["attention_mask"]), path=tmp_path / "strip.png")
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if p.get_gid() in plots.ROLE_COLORS]
    assert [p.get_gid() for p in boxes] == ["prompt"] * 5 + ["answer"] * 3 + ["padding"] * 2
    for box in boxes:
        assert to_hex(box.get_facecolor()) == plots.ROLE_COLORS[box.get_gid()]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [s.rsplit("(", 1)[1] for s in legend] == ["5 个)", "3 个)", "2 个)"]
    texts = [t.get_text() for t in ax.texts]
    assert "体育新闻" in texts and "<|im_end|>" in texts and texts.count("pad") == 2
    assert texts.count("-100") == 7 and {"6", "7", "8"} <= set(texts)  # the labels under the boxes
    assert (tmp_path / "strip.png").read_bytes()[:4] == b"\x89PNG"


def test_token_strip_of_a_long_row_shows_head_ellipsis_tail():
    ids = list(range(1, 101))
    labels = [-100] * 97 + ids[-3:]
    fig = plots.token_strip(ids, labels, FakeTokenizer(), head=4, tail=6)
    ax = fig.axes[0]
    assert [p.get_gid() for p in ax.patches] == ["prompt"] * 4 + ["ellipsis"] + ["prompt"] * 3 + ["answer"] * 3
    assert any("90" in t.get_text() and "…" in t.get_text() for t in ax.texts)  # 100 - 4 - 6 hidden tokens
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "(97 个)" in legend[0] and "(3 个)" in legend[1] and "(0 个)" in legend[2]  # counts over the whole row


def test_lora_counts_for_a_qwen2_q_proj():
    counts = plots.lora_parameter_counts(d_in=896, d_out=896, r=8)
    assert counts["W"] == 802_816 and counts["lora"] == 14_336
    assert counts["A"] == 8 * 896 and counts["B"] == 896 * 8
    assert counts["ratio"] == pytest.approx(14_336 / 802_816)


def test_lora_picture_shows_real_shapes_and_counts(tmp_path):
    fig = plots.lora_picture(896, 896, 8, 32, name="q_proj", path=tmp_path / "lora.png")
    ax = fig.axes[0]
    text = "\n".join(t.get_text() for t in ax.texts) + ax.get_title()
    for needle in ("802,816", "14,336", "896 × 896", "896 × 8", "8 × 896", "= 4", "1.79%", "q_proj"):
        assert needle in text, needle
    patches = {p.get_gid(): p for p in ax.patches}
    assert set(patches) == {"W", "A", "B"}
    assert patches["B"].get_height() == pytest.approx(patches["W"].get_height())  # B has W's d_out rows
    assert patches["A"].get_width() == pytest.approx(patches["W"].get_width())  # A has W's d_in columns
    assert (tmp_path / "lora.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("draw", [
    lambda: plots.label_distribution({"train": {"体育": 30, "财经": 28}, "test": {"体育": 10, "财经": 9}}),
    lambda: plots.length_histogram([380, 384, 384, 384, 200], 384, recipe_lengths=[900, 384, 500, 700, 200]),
    lambda: plots.learning_curve([{"epoch": 0, "eval_accuracy": 0.1}, {"epoch": 1, "eval_accuracy": 0.9}],
                                 chance=0.3),
])
def test_legend_does_not_cover_the_data(draw):
    fig = draw()
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent()), "the legend sits on the plotting area"
