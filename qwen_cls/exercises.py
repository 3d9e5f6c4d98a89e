"""Self-checking exercises of notebooks 01-06: ``check("NN.K", answer, **context)`` says right or wrong.

Each exercise at the end of a notebook has an answer cell (``answer_K = None``) and a check cell, e.g.
``check("01.3", answer_3, out_dir=out_dir)``. The check computes the expected value itself, from the run's own
files (``out_dir``) or the notebook's own objects passed as context (the tokenizer, the raw rows), never from a
typed-in number, so it holds for every profile and every run. It prints one line:

- ``✓ 正确 (right): ...`` with what the answer shows;
- ``✗ 还不对 (not yet): <hint>``: what to compute, and the likely slip when the answer matches one;
- ``… 还没有回答 (not answered yet)`` while the answer is ``None``: nothing is computed and nothing is
  raised, so ``qwen-cls run`` and nbval execute the notebooks with the answers left blank.

:func:`verdict` returns the same as a :class:`Verdict` (tests, scripts); :data:`CHECKS` maps each id to its check.
Solutions, with the answer to put in each cell, are in ``notebooks/solutions/NN_*.md``.

Taught in: 01, 02, 03, 04, 05, 06
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .files import DataError, read_jsonl

RIGHT, WRONG, UNANSWERED = "right", "wrong", "unanswered"
MARKS = {RIGHT: "✓ 正确 (right)", WRONG: "✗ 还不对 (not yet)", UNANSWERED: "… 还没有回答 (not answered yet)"}
# Which notebook writes what a check reads: a missing file names the notebook to run first.
MAKERS = {"data": "01_data_conversion", "tokenized": "02_tokenization", "truncation_report.json": "02_tokenization",
          "adapter": "03_lora_training", "run_config.json": "03_lora_training", "train_log.json": "03_lora_training",
          "predictions.jsonl": "04_evaluation", "metrics.json": "04_evaluation", "retriever": "05_rag",
          "rag_metrics.json": "05_rag", "rag_timing.json": "05_rag", "seq_cls": "06_approaches",
          "approaches.json": "06_approaches"}


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: ``status`` is ``right``, ``wrong`` or ``unanswered``; ``text`` the explanation or
    hint. ``str()`` is the line :func:`check` prints; truthy only when right."""

    exercise: str
    status: str
    text: str

    def __bool__(self) -> bool:
        return self.status == RIGHT

    def __str__(self) -> str:
        return f"{MARKS[self.status]} [{self.exercise}]: {self.text}"


class _Wrong(Exception):
    """Raised inside a check: the answer is wrong (or malformed); the message is the hint."""


CHECKS: dict[str, Callable] = {}


def _exercise(key: str):
    def register(function):
        CHECKS[key] = function
        return function
    return register


def answer_name(key: str) -> str:
    """The notebook variable an exercise's answer goes into: ``"01.3"`` -> ``answer_3``."""
    return f"answer_{key.split('.')[1]}"


def verdict(key: str, answer, **context) -> Verdict:
    """Check ``answer`` to exercise ``key`` (``"NN.K"``: notebook NN, exercise K) against the value computed
    from ``context`` (``out_dir=`` the run folder, and what the exercise needs: ``tokenizer=``, ``rows=``,
    ``max_length=``, ``k=``)."""
    if key not in CHECKS:
        raise KeyError(f"no exercise {key!r}; exercises: {', '.join(CHECKS)}")
    if answer is None:
        return Verdict(key, UNANSWERED, f"把答案写进 {answer_name(key)} (put your answer in {answer_name(key)}), "
                                        "再运行这一格 (then run this cell again)")
    try:
        return Verdict(key, RIGHT, CHECKS[key](answer, **context))
    except _Wrong as hint:
        return Verdict(key, WRONG, str(hint))


def check(key: str, answer, **context) -> None:
    """Print :func:`verdict`'s line: the notebooks' check cells call this."""
    print(verdict(key, answer, **context))


# ---------------------------------------------------------------------------------------------------------------
# Reading the run's files and the answers


def _path(out_dir, *parts) -> Path:
    """``out_dir/parts``; a missing one is a hint naming the notebook that writes it."""
    path = Path(out_dir).joinpath(*parts)
    if not path.exists():
        maker = MAKERS.get(parts[0], "前面的 notebook")
        raise _Wrong(f"还不能检查 (cannot check yet): {path} 不存在, 请先用同一个 out_dir 运行 {maker}.ipynb")
    return path


def _json(out_dir, name: str):
    return json.loads(_path(out_dir, name).read_text(encoding="utf-8"))


def _rows(out_dir, split: str) -> list[dict]:
    return read_jsonl(_path(out_dir, "data", f"{split}.jsonl"))


def _compared_test_rows(out_dir) -> list[dict]:
    """The test rows 05 and 06 compare: the first ``n_test`` of ``data/test.jsonl`` (``rag_timing.json``)."""
    return _rows(out_dir, "test")[:_json(out_dir, "rag_timing.json")["n_test"]]


def _number(answer, what: str) -> float:
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise _Wrong(f"{what} 应该是一个数 (a number), 你给的是 {type(answer).__name__}: {answer!r}")
    if not math.isfinite(answer):
        raise _Wrong(f"{what} 应该是一个有限的数 (a finite number), 你给的是 {answer!r}")
    return float(answer)


def _integer(answer, what: str) -> int:
    value = _number(answer, what)
    if value != int(value):
        raise _Wrong(f"{what} 应该是一个整数 (an integer), 你给的是 {answer!r}")
    return int(value)


def _pair(answer, what: str) -> tuple:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise _Wrong(f"{what} 应该是两个值 (a pair), 写成 (第一个, 第二个); 你给的是 {answer!r}")
    return tuple(answer)


def _triple(answer, what: str) -> tuple:
    if not isinstance(answer, (tuple, list)) or len(answer) != 3:
        raise _Wrong(f"{what} 应该是三个值, 写成 (最短, 中位数, 最长); 你给的是 {answer!r}")
    return tuple(answer)


def _close(a: float, b: float, tol: float = 5e-4) -> bool:
    """Equal up to rounding to 3 decimals (accuracies and their differences)."""
    return abs(a - b) <= tol


def _accuracy(y_true, predictions) -> float:
    from .metrics import classification_metrics

    return classification_metrics(list(y_true), list(predictions))["accuracy"]


# ---------------------------------------------------------------------------------------------------------------
# 01 data conversion


@_exercise("01.1")
def _validation_rows_another_seed_trains_on(answer, *, rows, max_train_samples=0, validation_rows=0, seed=42, **_):
    """This run's validation rows (``split_train_validation`` with ``seed``) that the split with ``seed + 1``
    would train on: a validation split holds only for the seed it was made with."""
    from .data import split_train_validation

    n = _integer(answer, "answer_1")
    _, validation = split_train_validation(rows, max_train_samples, validation_rows, seed)
    other_train, other_validation = split_train_validation(rows, max_train_samples, validation_rows, seed + 1)
    here = {r.line for r in validation}
    expected = len(here & {r.line for r in other_train})
    if n == expected:
        share = len(other_train) / len(rows)
        return (f"{n} 行: 这次的 {len(here)} 行验证数据里, 有 {n} 行在 seed = {seed + 1} 时会被拿去训练 "
                f"(随机分时平均约 {len(here)} × {len(other_train)} / {len(rows)} ≈ {len(here) * share:.1f} 行)。"
                "验证集只对分出它的那个种子成立: 换了种子又想比较分数, 验证行就可能已经训练过, 分数偏高。"
                "run_config.json 记下验证行的 SHA-256, 就是为了能核对两次运行用的是不是同一批验证行。")
    if n == 0:
        raise _Wrong(f"0 是同一个种子的答案 (验证行和训练行不相交)。换成 seed + 1 = {seed + 1} 后, 打乱的顺序完全不同: "
                     f"用 split_train_validation(all_train, max_train_samples, validation_rows, {seed + 1}) 取训练行, "
                     "再比较两组的行号 (r.line) 有几个共同的")
    if n == len(here):
        overlap = len(here & {r.line for r in other_validation})
        raise _Wrong(f"不是全部 {len(here)} 行: 换了种子, 有的行 ({overlap} 行) 又落进了验证集, 还有的行两边都没被选中 "
                     "(max_train_samples 不为 0 时)。数这次的验证行和 seed + 1 的训练行的共同行号")
    if not 0 <= n <= len(here):
        raise _Wrong(f"这次有 {len(here)} 行验证数据, 答案在 0 到 {len(here)} 之间, 不会是 {n}")
    raise _Wrong(f"先用 split_train_validation(all_train, max_train_samples, validation_rows, seed) 取这次的验证行, "
                 f"再用种子 {seed + 1} 取训练行, 比较两组的行号 (r.line) 集合有几个共同的元素")


@_exercise("01.2")
def _missing_output_message(answer, **_):
    """The DataError of a file whose second row lacks ``output``, from the file's name on."""
    from .data import read_raw_rows

    if isinstance(answer, DataError):
        answer = str(answer)
    if not isinstance(answer, str):
        raise _Wrong(f"answer_2 应该是报错信息的文字: try/except DataError as err, 再 answer_2 = str(err); "
                     f"你给的是 {type(answer).__name__}")
    with tempfile.TemporaryDirectory() as folder:
        bad = Path(folder) / "bad.jsonl"
        bad.write_text('{"text": "新闻", "category": ["Art", "Sports"], "output": "Art"}\n'
                       '{"text": "新闻", "category": ["Art", "Sports"]}\n', encoding="utf-8")
        try:
            read_raw_rows(bad)
        except DataError as err:
            expected = err
    tail = f":{expected.line}: {expected.message}"
    if answer.endswith(tail) and len(answer) > len(tail):
        where = answer[: -len(tail)]
        return (f"报错写明了文件 ({where}) 和行号 ({expected.line}), 以及缺什么、每行需要什么: 直接可以去修。"
                "命令行 qwen-cls convert 读到同样的文件时以状态码 2 退出, 不写出半个输出文件。")
    if ":1:" in answer:
        raise _Wrong("报错在第 1 行: 让第一行是一行完整的数据 (text, category, output), 只有第二行缺少 output")
    if "missing field(s)" in answer:
        raise _Wrong(f"只去掉第二行的 output 字段, 其他字段保留: 报错应该以 {tail!r} 结尾")
    raise _Wrong("写一个两行的 .jsonl 文件 (第一行完整, 第二行缺少 output), 用 read_raw_rows 读它, "
                 "except DataError as err: answer_2 = str(err)")


@_exercise("01.3")
def _text_lengths(answer, *, out_dir, **_):
    """(shortest, median, longest) characters of ``text`` in ``data/train.jsonl``."""
    shortest, median, longest = (_number(v, "answer_3 的每个值") for v in _triple(answer, "answer_3"))
    lengths = [len(r["text"]) for r in _rows(out_dir, "train")]
    expected = (min(lengths), statistics.median(lengths), max(lengths))
    if shortest == expected[0] and abs(median - expected[1]) <= 0.5 and longest == expected[2]:
        return (f"{len(lengths)} 行训练数据, 正文 {expected[0]} / {expected[1]:g} / {expected[2]} 个字。字数不等于 "
                "token 数: 02 会数 token, 超过 max_length 的行只缩短正文 (solutions 里有把字数换算成 token 的代码)。")
    in_bytes = [len(r["text"].encode("utf-8")) for r in _rows(out_dir, "train")]
    if (shortest, longest) == (min(in_bytes), max(in_bytes)):
        raise _Wrong("这是 UTF-8 的字节数 (一个汉字 3 个字节): 用 len(row['text']) 数字符")
    wrong = [name for name, a, e in (("最短", shortest, expected[0]), ("最长", longest, expected[2])) if a != e]
    wrong += ["中位数"] if abs(median - expected[1]) > 0.5 else []
    raise _Wrong(f"{'、'.join(wrong)}不对: 用 01 写出的训练行 train_rows (out_dir/data/train.jsonl), "
                 "lengths = [len(r['text']) for r in train_rows], 再取 min、statistics.median、max")


# ---------------------------------------------------------------------------------------------------------------
# 02 tokenization


@_exercise("02.1")
def _max_length_for_nine_tenths(answer, *, out_dir, tokenizer, **_):
    """The smallest ``max_length`` at which the answer-preserving rule shortens the text of at most a tenth of the
    training rows (``len(rows) // 10``): per row the whole prompt + the longest candidate + the end token (the rule
    reserves the longest candidate, not the row's answer)."""
    from .prompt import render_prompt
    from .tokenization import label_ids

    n = _integer(answer, "answer_1")
    rows = _rows(out_dir, "train")
    prompts = tokenizer([render_prompt(tokenizer, r["text"], r["category"]) for r in rows],
                        add_special_tokens=False)["input_ids"]
    need = sorted(len(p) + max(len(label_ids(tokenizer, c)) for c in r["category"]) + 1 for p, r in zip(prompts, rows))
    own = sorted(len(p) + len(label_ids(tokenizer, r["output"])) + 1 for p, r in zip(prompts, rows))
    allowed = len(rows) // 10
    expected = need[len(rows) - allowed - 1]
    if n == expected:
        cut = sum(x > n for x in need)
        return (f"max_length = {n}: {cut} 行 (≤ {allowed}) 的正文被缩短, 少一个 token 就是 "
                f"{sum(x > n - 1 for x in need)} 行; 一行都不缩短要 {need[-1]}。按长度分布的分位数选 max_length"
                ": 最长的少数几行不值得让每个 batch 都补齐到那么长, "
                "它们只缩短正文, 答案完整。")
    if n == need[-1] and n != expected:
        raise _Wrong(f"{n} 时一行都不缩短; 题目允许至多 {allowed} 行 (十分之一) 被缩短: 找最小的那个 max_length")
    if n == own[len(rows) - allowed - 1] and n != expected:
        raise _Wrong("规则按每行**最长的候选**留位置, 不是这一行自己的答案: 把 len(label_ids(tokenizer, output)) 换成 "
                     "max(len(label_ids(tokenizer, c)) for c in category)")
    cut = sum(x > n for x in need)
    if cut > allowed:
        raise _Wrong(f"max_length = {n} 时有 {cut} 行被缩短, 多于 {allowed} 行: 每行需要 "
                     "len(prompt 的 token, 正文完整) + 最长候选的 token 数 + 1; 排序后看第几大的值")
    raise _Wrong(f"max_length = {n} 时只有 {cut} 行被缩短 (≤ {allowed}), 但更小的值也可以: 找最小的那个")


@_exercise("02.2")
def _answer_tokens_the_recipe_cut_loses(answer, *, out_dir, tokenizer, cut_length, **_):
    """Answer tokens (answer + end token) that the recipe's tail cut ``[:cut_length]`` drops, over all training rows."""
    from .prompt import render_prompt
    from .tokenization import label_ids

    n = _integer(answer, "answer_2")
    cut_length = _integer(cut_length, "cut_length")
    rows = _rows(out_dir, "train")
    prompts = tokenizer([render_prompt(tokenizer, r["text"], r["category"]) for r in rows],
                        add_special_tokens=False)["input_ids"]
    answers = [len(label_ids(tokenizer, r["output"])) + 1 for r in rows]  # + end_id
    kept = [max(0, min(a, cut_length - len(p))) for p, a in zip(prompts, answers)]
    lost = sum(a - k for a, k in zip(answers, kept))
    gone, partly = sum(k == 0 for k in kept), sum(0 < k < a for k, a in zip(kept, answers))
    if n == lost:
        return (f"{lost} 个答案 token (共 {sum(answers)} 个, {lost / sum(answers):.0%}): {gone} 行整个答案没了, "
                f"{partly} 行只剩一部分。这些位置照样算了前向和反向, 却没有一个 loss; "
                "只剩半个答案的行还教模型写半个标签、不写结束符。"
                "我们的规则在同一个长度上缩短正文, 一个答案 token 也不丢。")
    if n in (gone + partly, gone, partly) and n != lost:
        raise _Wrong(f"这是行数 (整个答案没了 {gone} 行, 只剩一部分 {partly} 行); 要的是丢掉的答案 token 数: "
                     "每行 len(answer) - 还剩几个, 再求和")
    if n == sum(kept) and n != lost:
        raise _Wrong("这是还剩下的答案 token 数; 要的是丢掉的: 全部答案 token 数减去它")
    raise _Wrong(f"对每一行: labels = ([-100] * len(prompt_ids) + answer_ids)[:{cut_length}], answer_ids 是答案 + "
                 "结束符; 丢掉的是 len(answer_ids) 减去 labels 里不是 -100 的个数, "
                 "对所有行求和 (第 6 节的 kept 和 answers)")


@_exercise("02.3")
def _rows_whose_longest_candidate_is_longer(answer, *, out_dir, tokenizer, **_):
    """Training rows whose longest candidate takes more tokens than their own answer: rows for which the rule
    reserves more room than the answer needs."""
    from .tokenization import label_ids

    n = _integer(answer, "answer_3")
    rows = _rows(out_dir, "train")
    size = {c: len(label_ids(tokenizer, c)) for r in rows for c in r["category"]}
    expected = sum(max(size[c] for c in r["category"]) > size[r["output"]] for r in rows)
    if n == expected:
        longest = max(size, key=size.get)
        return (f"{n}/{len(rows)} 行: 这些行的预算比答案需要的多 (最长的标签 {longest!r} 有 {size[longest]} 个 token)。"
                "多留的位置让同一行在训练和推理时的 prompt 一模一样: 推理时不知道答案, 只能按最长的候选留; "
                "按答案留的话, 训练时正文的长度会悄悄透露答案有多长。")
    multi_answer = sum(size[r["output"]] > 1 for r in rows)
    any_multi = sum(any(size[c] > 1 for c in r["category"]) for r in rows)
    if n == multi_answer and n != expected:
        raise _Wrong("这是答案本身超过 1 个 token 的行数; 要比较的是每行最长的候选和这一行自己的答案")
    if n == any_multi and n != expected:
        raise _Wrong("这是有多 token 候选的行数; 其中答案本身就是最长候选的行, 预算恰好够用, 不算")
    raise _Wrong("对每一行: max(len(label_ids(tokenizer, c)) for c in row['category']) > "
                 "len(label_ids(tokenizer, row['output'])) 的行有几行")


# ---------------------------------------------------------------------------------------------------------------
# 03 LoRA training


def _adapter_shapes(folder: Path) -> dict[str, tuple]:
    """Tensor name -> shape in a saved adapter, read from the safetensors header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


@_exercise("03.1")
def _movement_at_recipe_lr(answer, *, out_dir, **_):
    """How far Adam can move one LoRA weight in this run's steps at the recipe's learning rate 1e-4."""
    value = _number(answer, "answer_1")
    config = _json(out_dir, "run_config.json")
    steps, lr = config["training"]["global_step"], config["training"]["learning_rate"]
    expected = steps * 1e-4
    if math.isclose(value, expected, rel_tol=0.01):
        why = ("随机的 tiny 模型什么也不会, 要大步长才看得到变化" if config["base_model"] == "tiny"
               else "预训练模型只需小小地调整, 但这次只训练这几步")
        return (f"{steps} 步 × 1e-4 = {expected:g}。LoRA 的 B 矩阵从 0 开始, 整个训练里每个元素最多离开 0 这么远 "
                "(学习率还会线性衰减, 实际更少): B·A 几乎还是 0, 模型几乎没变, loss 曲线几乎是平的。"
                f"{why}, 所以这次用 {lr:g} (最多 {steps * lr:g}); 原配方在真实的 Qwen2-0.5B 上训练得更久, "
                "1e-4 就够了。")
    if math.isclose(value, steps * lr, rel_tol=0.01) and not math.isclose(lr, 1e-4):
        raise _Wrong(f"这是这次运行的学习率 {lr:g} 的结果; 题目问的是原配方的 1e-4")
    if math.isclose(value, steps, rel_tol=0.01):
        raise _Wrong("这是优化步数; 每一步最多移动约 learning_rate (1e-4), 整个训练最多移动多少?")
    raise _Wrong("run_config['training']['global_step'] 是优化步数; Adam 每步最多移动约 learning_rate: "
                 "用 1e-4 时整个训练最多移动 步数 × 1e-4")


@_exercise("03.2")
def _params_at_rank_16(answer, *, out_dir, **_):
    """(trainable parameters with r=16, lora_alpha / 16), from the saved adapter's shapes."""
    params, scale = _pair(answer, "answer_2")
    params, scale = _integer(params, "可训练参数"), _number(scale, "alpha / r")
    shapes = _adapter_shapes(_path(out_dir, "adapter"))
    lora = _json(out_dir, "run_config.json")["lora"]
    d_in = sum(shape[1] for name, shape in shapes.items() if "lora_A" in name)
    d_out = sum(shape[0] for name, shape in shapes.items() if "lora_B" in name)
    now = sum(math.prod(shape) for name, shape in shapes.items() if "lora_" in name)
    expected = 16 * (d_in + d_out)
    layers = sum("lora_A" in name for name in shapes)
    if params == expected and math.isclose(scale, lora["lora_alpha"] / 16):
        return (f"{layers} 个线性层, 每层 r × (d_in + d_out): r = 16 时共 {expected:,} 个可训练参数 (r = "
                f"{lora['r']} 时 {now:,}, 和 r 成正比); 缩放 alpha / r = {lora['lora_alpha']} / 16 = "
                f"{lora['lora_alpha'] / 16:g}: r 越大, 每个方向的更新被缩得越小。")
    if params == now and params != expected:
        raise _Wrong(f"{now:,} 是 r = {lora['r']} 时的参数 (上面 print_trainable_parameters 的数); 每层 "
                     "r × (d_in + d_out), r 变成 16 时是多少?")
    if params != expected:
        raise _Wrong("可训练参数不对: 每个 LoRA 层有 A (r × d_in) 和 B (d_out × r), 共 r × (d_in + d_out); "
                     "对所有层求和 (形状见第 2 节的 lora_layers 或 adapter/adapter_model.safetensors)")
    raise _Wrong(f"缩放系数不对: lora_alpha 不变 ({lora['lora_alpha']}), r = 16")


@_exercise("03.3")
def _lm_head_positions_ratio(answer, *, out_dir, **_):
    """All positions of the training rows / positions whose next token is supervised."""
    from datasets import load_from_disk

    from .tokenization import IGNORE_INDEX

    value = _number(answer, "answer_3")
    data = load_from_disk(str(_path(out_dir, "tokenized", "train")))
    positions = sum(data["length"])
    answer_positions = sum(sum(t != IGNORE_INDEX for t in labels) for labels in data["labels"])
    expected = positions / answer_positions
    if abs(value - expected) <= 0.051:  # rounded to one decimal
        return (f"{positions:,} 个位置 / {answer_positions:,} 个答案位置 ≈ {expected:.1f} 倍: 普通 Trainer 在每个位置都"
                "算整个词表的 logits, 绝大部分直接丢掉; loss 相同 (第 5 节验证过), 只是计算量不同。用普通 Trainer "
                "真的训练一遍比较速度, 见 solutions 里的代码。")
    if expected > 1 and abs(value - 1 / expected) <= 0.01:
        raise _Wrong("倒过来了: 要的是 全部位置 / 答案位置 (大于 1)")
    if abs(value - positions / len(data)) <= 0.51:
        raise _Wrong("这是平均每行的 token 数; 再除以平均每行计算 loss 的 token 数 (labels != -100)")
    raise _Wrong("全部位置 = sum(train_dataset['length']); 答案位置 = 所有行里 labels != -100 的个数; "
                 "答案写 全部位置 / 答案位置")


# ---------------------------------------------------------------------------------------------------------------
# 04 evaluation


@_exercise("04.1")
def _fixed_by_lora(answer, *, out_dir, **_):
    """Test rows LoRA gets right and zero-shot (the same model, adapter off) gets wrong, from ``predictions.jsonl``
    (zero-shot's prediction: the candidate with the highest ``zero_shot_scores``)."""
    n = _integer(answer, "answer_1")
    rows = read_jsonl(_path(out_dir, "predictions.jsonl"))
    zero = [max(r["zero_shot_scores"], key=r["zero_shot_scores"].get) for r in rows]
    lora_right = [r["prediction"] == r["output"] for r in rows]
    zero_right = [z == r["output"] for z, r in zip(zero, rows)]
    fixed = sum(a and not b for a, b in zip(lora_right, zero_right))
    broken = sum(b and not a for a, b in zip(lora_right, zero_right))
    if n == fixed:
        return (f"{fixed} 行: LoRA 答对而 zero-shot 答错; 反过来 (LoRA 答错而 zero-shot 答对) 有 {broken} 行。"
                f"accuracy 之差 = ({fixed} − {broken}) / {len(rows)}: 微调不只是纠正错误, 也会把原来对的行改错。")
    if n == broken and fixed != broken:
        raise _Wrong("反过来了: 这是 zero-shot 答对而 LoRA 答错的行数; 要的是 prediction == output 而 zero-shot "
                     "的预测 != output")
    if n == fixed - broken and broken:
        raise _Wrong("这是两者答对行数之差 (净增加); 有的行 LoRA 反而答错了, 只数 LoRA 对、zero-shot 错的行")
    if n == sum(lora_right) and n != fixed:
        raise _Wrong("这是 LoRA 答对的全部行数; 其中 zero-shot 也答对的行不算")
    raise _Wrong("读 out_dir / 'predictions.jsonl': zero-shot 的预测是 zero_shot_scores 里分数最高的候选, "
                 "数 prediction == output 且 zero-shot 的预测 != output 的行")


@_exercise("04.2")
def _changed_by_mean_score(answer, *, out_dir, tokenizer, **_):
    """Rows whose prediction changes when each candidate's score is divided by its tokens + end token."""
    from .tokenization import label_ids

    n = _integer(answer, "answer_2")
    rows = read_jsonl(_path(out_dir, "predictions.jsonl"))

    def changed(extra: int) -> int:
        mean = [max(r["scores"], key=lambda c: r["scores"][c] / (len(label_ids(tokenizer, c)) + extra)) for r in rows]
        return sum(m != r["prediction"] for m, r in zip(mean, rows))

    expected = changed(1)
    if n == expected:
        return (f"{n}/{len(rows)} 行的预测变了。平均值偏向 token 多的长标签 (后面的 token 往往很好猜); 总和就是"
                "“写出整个答案并停下”的概率, 是更自然的规则。")
    if n == len(rows) - expected:
        raise _Wrong("这是预测没变的行数; 要的是变了的")
    if n == changed(0) and changed(0) != expected:
        raise _Wrong("分母要加上结束符: score / (标签的 token 数 + 1)")
    raise _Wrong("对每行: mean = max(scores, key=lambda c: scores[c] / (len(label_ids(tokenizer, c)) + 1)), "
                 "再数 mean != prediction 的行")


@_exercise("04.3")
def _answers_longer_than_one_token(answer, *, out_dir, tokenizer, **_):
    """Test rows whose answer takes more than 1 token (end token not counted): ``max_new_tokens = 1`` cannot
    write it."""
    from .tokenization import label_ids

    n = _integer(answer, "answer_3")
    rows = _rows(out_dir, "test")
    expected = sum(len(label_ids(tokenizer, r["output"])) > 1 for r in rows)
    if n == expected:
        longest = max({r["output"] for r in rows}, key=lambda label: len(label_ids(tokenizer, label)))
        return (f"{n}/{len(rows)} 行: 这些答案一个 token 写不完, 生成一定无效 (最长的标签 {longest!r} 有 "
                f"{len(label_ids(tokenizer, longest))} 个 token)。候选打分不生成 token, 直接算每个完整候选的概率, "
                "所以不受 max_new_tokens 影响, 预测也永远是合法标签。")
    if n == len(rows) and expected < n:
        raise _Wrong("不算结束符: 只数标签本身的 token (label_ids(tokenizer, output))")
    if n == sum(any(len(label_ids(tokenizer, c)) > 1 for c in r["category"]) for r in rows):
        raise _Wrong("只看每行的正确答案 output, 不是所有候选")
    raise _Wrong("对 test_rows 的每一行数 len(label_ids(tokenizer, row['output'])) > 1 的行")


# ---------------------------------------------------------------------------------------------------------------
# 05 RAG


def _wrong_pair(got: tuple[float, float], expected: tuple[float, float], names: tuple[str, str], how: str):
    """The hint for a pair of accuracies that is not ``expected``: the two swapped, or which one is off and ``how``
    to compute it."""
    if _close(got[0], expected[1]) and _close(got[1], expected[0]):
        return _Wrong(f"顺序反了: ({names[0]} 的 accuracy, {names[1]} 的 accuracy)")
    which = names[0] if not _close(got[0], expected[0]) else names[1]
    return _Wrong(f"{which} 的不对: {how}")


@_exercise("05.1")
def _vote_at_k_1_and_10(answer, *, out_dir, **_):
    """(retrieval-vote accuracy with k=1, with k=10) on 05's test rows, from the saved retriever."""
    from .rag import Retriever, retrieval_vote

    at_1, at_10 = (_number(v, "accuracy") for v in _pair(answer, "answer_1"))
    retriever = Retriever.load(_path(out_dir, "retriever"))
    rows = _compared_test_rows(out_dir)
    y_true = [r["output"] for r in rows]

    def vote(k: int) -> float:
        found = retriever.retrieve_batch([r["text"] for r in rows], k)
        return _accuracy(y_true, [retrieval_vote(f, r["category"], prior=retriever.label_counts)
                                  for f, r in zip(found, rows)])

    expected = (vote(1), vote(10))
    if _close(at_1, expected[0]) and _close(at_10, expected[1]):
        used = _json(out_dir, "rag_metrics.json")["retrieval_vote"]["accuracy"]
        return (f"k = 1: {expected[0]:.3f}, k = 10: {expected[1]:.3f} (这次运行的 rag_k: {used:.3f})。"
                "k = 1 只听最相似的一条; k 大一些能纠正个别错误的邻居, 但靠后的邻居越来越不像查询 "
                "(按 BM25 得分加权让它们分量更小)。"
                "RAG prompt 的长度固定: 例子越多, 留给查询正文的 token 越少。")
    raise _wrong_pair((at_1, at_10), expected, ("k = 1", "k = 10"),
                      "found = retriever.retrieve_batch([row['text'] for row in test_rows], k), 再用第 2 "
                      "节的 retrieval_vote(..., prior=retriever.label_counts) 和 classification_metrics")


@_exercise("05.2")
def _test_rows_among_neighbours(answer, *, out_dir, k=3, **_):
    """Test rows with at least one other test row among their ``k`` neighbours (``retrieve_batch``, which drops
    only the query and its duplicates) in an index of train + test rows."""
    from .rag import Retriever, retrieval_vote

    n = _integer(answer, "answer_2")
    train, rows = _rows(out_dir, "train"), _compared_test_rows(out_dir)
    leaky = Retriever.build(train + rows)
    found = leaky.retrieve_batch([r["text"] for r in rows], k)
    from_test = [sum(f.index >= len(train) for f in row_found) for row_found in found]
    expected = sum(c > 0 for c in from_test)
    if n == expected:
        leaked = _accuracy([r["output"] for r in rows], [retrieval_vote(f, r["category"], prior=leaky.label_counts)
                                                         for f, r in zip(found, rows)])
        honest = _json(out_dir, "rag_metrics.json")["retrieval_vote"]["accuracy"]
        return (f"{n}/{len(rows)} 行的 {k} 个邻居里有别的测试行 (共 {sum(from_test)} 个), 它们带着测试集的标签投票: "
                f"检索投票 accuracy {leaked:.3f} (诚实的索引 {honest:.3f})。规则只排除查询自己和它的重复, 挡不住"
                "其他测试行: 检索库只能来自训练行, 否则评估就用上了测试集的答案。")
    if n == 0 and expected:
        raise _Wrong("规则只排除查询自己 (和文本相同的行), 不排除其他测试行: 看每个邻居的行号 n.index, "
                     "行号 ≥ len(train_rows) 的来自测试行")
    if n == sum(from_test) and n != expected:
        raise _Wrong("这是来自测试行的邻居总数; 要的是至少有一个这样的邻居的测试行数")
    if n == len(rows) and expected < n:
        raise _Wrong("不是每一行: 逐行看 k 个邻居的行号 (n.index ≥ len(train_rows) 的来自测试行)")
    raise _Wrong("leaky = Retriever.build(train_rows + test_rows); found = leaky.retrieve_batch(texts, rag_k); "
                 "数 any(n.index >= len(train_rows) for n in row_found) 的行")


@_exercise("05.3")
def _rows_rag_fixed_and_broke(answer, *, out_dir, **_):
    """(rows ``lora_rag`` gets right and ``lora`` wrong, rows ``lora`` gets right and ``lora_rag`` wrong) in
    ``rag_predictions.jsonl``."""
    fixed, broke = (_integer(v, "行数") for v in _pair(answer, "answer_3"))
    rows = read_jsonl(_path(out_dir, "rag_predictions.jsonl"))
    right = {m: [r["predictions"][m] == r["output"] for r in rows] for m in ("lora", "lora_rag")}
    expected = (sum(b and not a for a, b in zip(right["lora"], right["lora_rag"])),
                sum(a and not b for a, b in zip(right["lora"], right["lora_rag"])))
    if (fixed, broke) == expected:
        changed = sum(r["predictions"]["lora"] != r["predictions"]["lora_rag"] for r in rows)
        tiny = _json(out_dir, "run_config.json")["base_model"] == "tiny"
        return (f"例子改对 {expected[0]} 行, 改错 {expected[1]} 行 (预测变了的 {changed} 行里, 其余两边都错): "
                f"lora_rag − lora = ({expected[0]} − {expected[1]}) / {len(rows)} = "
                f"{(expected[0] - expected[1]) / len(rows):+.3f}。"
                + (" 这是 tiny 随机模型: 这些变化只是噪声。" if tiny else
                   " LoRA 只见过普通 prompt: RAG prompt 对它是新格式, 例子里邻居的标签可能把它带偏。"))
    if (broke, fixed) == expected and fixed != broke:
        raise _Wrong("顺序反了: (lora_rag 对而 lora 错的行数, lora 对而 lora_rag 错的行数)")
    changed = sum(r["predictions"]["lora"] != r["predictions"]["lora_rag"] for r in rows)
    if changed in (fixed, broke) and changed not in expected:
        raise _Wrong(f"{changed} 是预测变了的行数; 其中有的行两边都错: 只数一边对、一边错的行")
    raise _Wrong("读 out_dir / 'rag_predictions.jsonl': 每行 predictions['lora'] 和 predictions['lora_rag'] "
                 "分别和 output 比较, 数 (lora_rag 对且 lora 错, lora 对且 lora_rag 错)")


# ---------------------------------------------------------------------------------------------------------------
# 06 approaches


def _tfidf_accuracy(train_rows, test_rows, vectorizer) -> float:
    """06's ``tfidf_logreg`` with another vectorizer (or fewer training rows), restricted to the candidates."""
    from .approaches import restricted_rows, tfidf_logreg

    pipe = tfidf_logreg(vectorizer)
    pipe.fit([r["text"] for r in train_rows], [r["output"] for r in train_rows])
    scored = restricted_rows(pipe.predict_log_proba([r["text"] for r in test_rows]), list(pipe.classes_), test_rows)
    return _accuracy([r["output"] for r in test_rows], [s.prediction for s in scored])


@_exercise("06.1")
def _tfidf_variants(answer, *, out_dir, **_):
    """(accuracy with jieba words (1, 1), with characters (1, 2)) of ``tfidf_logreg`` on 06's rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    words, chars = (_number(v, "accuracy") for v in _pair(answer, "answer_1"))
    train, test = _rows(out_dir, "train"), _compared_test_rows(out_dir)
    from .approaches import word_vectorizer

    expected = (_tfidf_accuracy(train, test, word_vectorizer((1, 1))),
                _tfidf_accuracy(train, test, TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)))
    if _close(words, expected[0]) and _close(chars, expected[1]):
        base = _json(out_dir, "approaches.json")["tfidf_logreg"]["accuracy"]
        return (f"jieba 词 (1, 2): {base:.3f}, 只用词 (1, 1): {expected[0]:.3f}, 按字 (1, 2): {expected[1]:.3f}。"
                "两个相邻的汉字大多就是一个词或词的一部分, 不需要分词器; jieba 切错的词、没见过的人名公司名在字的层面"
                "仍和训练行有重叠。"
                + ("合成的 tiny 样例上什么都分得开, 差别要在真实的 THUCNews 上看 (gemma3-270m profile)。"
                   if _json(out_dir, "run_config.json")["base_model"] == "tiny" else ""))
    raise _wrong_pair((words, chars), expected, ("jieba 词 (1, 1)", "按字 (1, 2)"),
                      "除了 TfidfVectorizer 的参数, 其余和第 2 节相同 (sublinear_tf=True, "
                      "LogisticRegression(C=10.0, max_iter=1000), restricted_rows 只在候选里选)")


@_exercise("06.2")
def _tfidf_on_half(answer, *, out_dir, **_):
    """``tfidf_logreg``'s accuracy trained on the first half of the training rows."""
    value = _number(answer, "answer_2")
    train, test = _rows(out_dir, "train"), _compared_test_rows(out_dir)
    from .approaches import word_vectorizer

    expected = _tfidf_accuracy(train[:len(train) // 2], test, word_vectorizer((1, 2)))
    full = _json(out_dir, "approaches.json")["tfidf_logreg"]["accuracy"]
    if _close(value, expected):
        return (f"一半的训练行 ({len(train) // 2}): {expected:.3f}, 全部 ({len(train)}): {full:.3f}, 差 "
                f"{full - expected:+.3f} (全部 − 一半)。TF-IDF 只认识训练行里出现过的词; 预训练模型 (seq_cls_lora) "
                "对没见过的词也有表示, 数据少时通常掉得少: 标注数据越少, 预训练知识越重要。")
    if _close(value, full) and not _close(full, expected):
        raise _Wrong("这是用全部训练行的 accuracy (approaches.json); 要只用 train_rows[:len(train_rows) // 2] 重新训练")
    raise _Wrong("和第 2 节相同的 make_pipeline(TfidfVectorizer(...), LogisticRegression(...)), 只在 "
                 "train_rows[:len(train_rows) // 2] 上 fit, 再在同样的 test_rows 上算 accuracy")


@_exercise("06.3")
def _saved_head(answer, *, out_dir, **_):
    """(parameters of the module saved whole beside the LoRA weights, parameters of the LoRA weights) in
    ``seq_cls/adapter_model.safetensors``."""
    from .approaches import SEQ_CLS_HEAD

    head_count, lora_count = (_integer(v, "参数个数") for v in _pair(answer, "answer_3"))
    folder = _path(out_dir, "seq_cls")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    shapes = _adapter_shapes(folder)
    head = {k: s for k, s in shapes.items() if f".{SEQ_CLS_HEAD}." in k and "lora_" not in k}
    expected = sum(math.prod(s) for s in head.values())
    lora = sum(math.prod(s) for k, s in shapes.items() if "lora_" in k)
    if (head_count, lora_count) == (expected, lora) and SEQ_CLS_HEAD in (config.get("modules_to_save") or []):
        shape = " + ".join(str(s) for s in head.values())
        return (f"{SEQ_CLS_HEAD!r}: {expected:,} 个参数 ({shape}, 标签数 × hidden_size), 和 {lora:,} 个 LoRA 参数"
                f" 一起保存 (两者之和 {expected + lora:,} 就是 print_trainable_parameters 的 trainable params)。"
                "忘了它 (task_type=None, 没有 modules_to_save), 这些参数不训练也不保存; "
                "重新加载时基座新建一个不同的随机头, 预测和随机猜差不多, 日志里只有一行 score.weight | MISSING "
                "(正确保存时也有这一行), 所以 save_seq_cls 在保存前检查 modules_to_save, 06 保存后重新加载并比较预测。")
    if (head_count, lora_count) == (lora, expected) and expected != lora:
        raise _Wrong("顺序反了: (头的参数个数, LoRA 的参数个数)")
    if expected + lora in (head_count, lora_count):
        raise _Wrong(f"{expected + lora:,} 是所有保存的 (可训练的) 参数: 把名字含 lora_ 的张量和不含的分开数")
    if head_count != expected:
        raise _Wrong("头的参数个数不对: 用 safetensors.safe_open 列出 seq_cls/adapter_model.safetensors 里的张量, "
                     "名字不含 lora_A / lora_B 的那个是完整保存的模块, 把它的形状相乘 (标签数 × hidden_size)")
    raise _Wrong("LoRA 的参数个数不对: 名字含 lora_ 的张量, 形状相乘再求和")
