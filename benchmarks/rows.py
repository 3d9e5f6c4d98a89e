"""Benchmark rows with the real data's length mix, made from the bundled sample texts.

The real Fudan news texts average about 3.2k tokens, so under the recipe's MAX_LENGTH 384 most rows
reach the cap. Each synthetic row concatenates sample texts (starting at a different one each time) up
to a target length drawn from a log-normal with mean ~3.2k tokens; candidates are 2-5 real Fudan labels.
"""

from __future__ import annotations

import random
from pathlib import Path

FUDAN_LABELS = ["Art", "Literature", "Education", "Philosophy", "History", "Space", "Energy", "Electronics",
                "Communication", "Computer", "Mine", "Transport", "Enviornment", "Agriculture", "Economy",
                "Law", "Medical", "Military", "Politics", "Sports"]
SAMPLE_FILES = ("data/sample/train.jsonl", "data/sample/test.jsonl")
CHARS_PER_TOKEN = 1.45  # Qwen2 on Chinese news, measured on the sample texts; only steers the target length
# Used only when data/sample is absent: short news-style paragraphs.
FALLBACK_TEXTS = [
    "新华社北京电 国家体育总局今天宣布，全国运动会将于明年秋季在广东举行，各省代表团正在积极备战。",
    "据中国科学院消息，我国自主研制的遥感卫星已顺利进入预定轨道，将用于国土资源普查和环境监测。",
    "本报讯 记者从农业部获悉，今年全国粮食总产量再创新高，小麦和水稻的单产均比去年有所提高。",
    "最高人民法院日前发布司法解释，进一步明确了合同纠纷案件中违约金的计算标准和举证责任。",
    "中国人民银行决定下调金融机构存款准备金率，以保持银行体系流动性合理充裕，支持实体经济发展。",
    "该医院心血管内科团队成功完成一例高难度介入手术，患者术后恢复良好，已于近日康复出院。",
    "教育部要求各地中小学切实减轻学生课业负担，保证学生每天一小时校园体育活动时间。",
    "考古工作者在陕西发掘出一批西周时期的青铜器，对研究当时的礼制和铸造工艺具有重要价值。",
]


def sample_texts(root: str | Path = ".") -> list[str]:
    """Texts of the bundled sample data (``data/sample``), or the fallback paragraphs."""
    from qwen_cls.files import read_jsonl

    texts = []
    for name in SAMPLE_FILES:
        path = Path(root) / name
        if path.is_file():
            texts += [r["text"] for r in read_jsonl(path)]
    return texts or list(FALLBACK_TEXTS)


def synth_rows(n: int, *, mean_tokens: float = 3200, seed: int = 0, root: str | Path = ".") -> list[dict]:
    """``n`` raw rows ``{text, category, output}`` whose lengths mix like the real data's."""
    rng = random.Random(seed)
    texts = sample_texts(root)
    sigma = 0.8
    mu = _log_mean_to_mu(mean_tokens, sigma)
    rows = []
    for i in range(n):
        target_chars = int(min(max(rng.lognormvariate(mu, sigma), 150), 20000) * CHARS_PER_TOKEN)
        parts, size, k = [], 0, i
        while size < target_chars:
            piece = texts[k % len(texts)]
            parts.append(piece)
            size += len(piece)
            k += 1
        labels = rng.sample(FUDAN_LABELS, rng.randint(2, 5))
        rows.append({"text": "\n".join(parts)[:target_chars], "category": labels, "output": rng.choice(labels)})
    return rows


def _log_mean_to_mu(mean: float, sigma: float) -> float:
    import math

    return math.log(mean) - sigma ** 2 / 2
