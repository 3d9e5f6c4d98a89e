"""The exercises of notebooks 01 and 02, their expected values computed from the run's data rows and the tokenizer:
01.1 the validation rows another seed would train on, 01.2 the error a row without ``output`` gets, 01.3 the
training texts' lengths; 02.1 the ``max_length`` that cuts a tenth of the rows, 02.2 the answer tokens the recipe's
tail cut loses, 02.3 the rows whose longest candidate is longer than their answer. :mod:`qwen_cls.exercises`
checks them.

Taught in: 01, 02
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .exercises_base import (
    NotYet,
    as_integer,
    as_number,
    as_triple,
    exercise,
    run_rows,
)
from .files import DataError

# ---------------------------------------------------------------------------------------------------------------
# 01 data conversion


@exercise("01.1")
def _validation_rows_another_seed_trains_on(answer, *, rows, max_train_samples=0, validation_rows=0, seed=42, **_):
    """This run's validation rows (``split_train_validation`` with ``seed``) that the split with ``seed + 1``
    would train on: a validation split holds only for the seed it was made with."""
    from .data import split_train_validation

    n = as_integer(answer, "answer_1")
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
        raise NotYet(f"0 是同一个种子的答案 (验证行和训练行不相交)。换成 seed + 1 = {seed + 1} 后, 打乱的顺序完全不同: "
                     f"用 split_train_validation(all_train, max_train_samples, validation_rows, {seed + 1}) 取训练行, "
                     "再比较两组的行号 (r.line) 有几个共同的")
    if n == len(here):
        overlap = len(here & {r.line for r in other_validation})
        raise NotYet(f"不是全部 {len(here)} 行: 换了种子, 有的行 ({overlap} 行) 又落进了验证集, 还有的行两边都没被选中 "
                     "(max_train_samples 不为 0 时)。数这次的验证行和 seed + 1 的训练行的共同行号")
    if not 0 <= n <= len(here):
        raise NotYet(f"这次有 {len(here)} 行验证数据, 答案在 0 到 {len(here)} 之间, 不会是 {n}")
    raise NotYet(f"先用 split_train_validation(all_train, max_train_samples, validation_rows, seed) 取这次的验证行, "
                 f"再用种子 {seed + 1} 取训练行, 比较两组的行号 (r.line) 集合有几个共同的元素")


@exercise("01.2")
def _missing_output_message(answer, **_):
    """The DataError of a file whose second row lacks ``output``, from the file's name on."""
    from .data import read_raw_rows

    if isinstance(answer, DataError):
        answer = str(answer)
    if not isinstance(answer, str):
        raise NotYet(f"answer_2 应该是报错信息的文字: try/except DataError as err, 再 answer_2 = str(err); "
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
        raise NotYet("报错在第 1 行: 让第一行是一行完整的数据 (text, category, output), 只有第二行缺少 output")
    if "missing field(s)" in answer:
        raise NotYet(f"只去掉第二行的 output 字段, 其他字段保留: 报错应该以 {tail!r} 结尾")
    raise NotYet("写一个两行的 .jsonl 文件 (第一行完整, 第二行缺少 output), 用 read_raw_rows 读它, "
                 "except DataError as err: answer_2 = str(err)")


@exercise("01.3")
def _text_lengths(answer, *, out_dir, **_):
    """(shortest, median, longest) characters of ``text`` in ``data/train.jsonl``."""
    shortest, median, longest = (as_number(v, "answer_3 的每个值") for v in as_triple(answer, "answer_3"))
    lengths = [len(r["text"]) for r in run_rows(out_dir, "train")]
    expected = (min(lengths), statistics.median(lengths), max(lengths))
    if shortest == expected[0] and abs(median - expected[1]) <= 0.5 and longest == expected[2]:
        return (f"{len(lengths)} 行训练数据, 正文 {expected[0]} / {expected[1]:g} / {expected[2]} 个字。字数不等于 "
                "token 数: 02 会数 token, 超过 max_length 的行只缩短正文 (solutions 里有把字数换算成 token 的代码)。")
    in_bytes = [len(r["text"].encode("utf-8")) for r in run_rows(out_dir, "train")]
    if (shortest, longest) == (min(in_bytes), max(in_bytes)):
        raise NotYet("这是 UTF-8 的字节数 (一个汉字 3 个字节): 用 len(row['text']) 数字符")
    wrong = [name for name, a, e in (("最短", shortest, expected[0]), ("最长", longest, expected[2])) if a != e]
    wrong += ["中位数"] if abs(median - expected[1]) > 0.5 else []
    raise NotYet(f"{'、'.join(wrong)}不对: 用 01 写出的训练行 train_rows (out_dir/data/train.jsonl), "
                 "lengths = [len(r['text']) for r in train_rows], 再取 min、statistics.median、max")


# ---------------------------------------------------------------------------------------------------------------
# 02 tokenization


@exercise("02.1")
def _max_length_for_nine_tenths(answer, *, out_dir, tokenizer, **_):
    """The smallest ``max_length`` at which the answer-preserving rule shortens the text of at most a tenth of the
    training rows (``len(rows) // 10``): per row the whole prompt + the longest candidate + the end token (the rule
    reserves the longest candidate, not the row's answer)."""
    from .prompt import render_prompt
    from .tokenization import label_ids

    n = as_integer(answer, "answer_1")
    rows = run_rows(out_dir, "train")
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
        raise NotYet(f"{n} 时一行都不缩短; 题目允许至多 {allowed} 行 (十分之一) 被缩短: 找最小的那个 max_length")
    if n == own[len(rows) - allowed - 1] and n != expected:
        raise NotYet("规则按每行**最长的候选**留位置, 不是这一行自己的答案: 把 len(label_ids(tokenizer, output)) 换成 "
                     "max(len(label_ids(tokenizer, c)) for c in category)")
    cut = sum(x > n for x in need)
    if cut > allowed:
        raise NotYet(f"max_length = {n} 时有 {cut} 行被缩短, 多于 {allowed} 行: 每行需要 "
                     "len(prompt 的 token, 正文完整) + 最长候选的 token 数 + 1; 排序后看第几大的值")
    raise NotYet(f"max_length = {n} 时只有 {cut} 行被缩短 (≤ {allowed}), 但更小的值也可以: 找最小的那个")


@exercise("02.2")
def _answer_tokens_the_recipe_cut_loses(answer, *, out_dir, tokenizer, cut_length, **_):
    """Answer tokens (answer + end token) that the recipe's tail cut ``[:cut_length]`` drops, over all training rows."""
    from .prompt import render_prompt
    from .tokenization import label_ids

    n = as_integer(answer, "answer_2")
    cut_length = as_integer(cut_length, "cut_length")
    rows = run_rows(out_dir, "train")
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
        raise NotYet(f"这是行数 (整个答案没了 {gone} 行, 只剩一部分 {partly} 行); 要的是丢掉的答案 token 数: "
                     "每行 len(answer) - 还剩几个, 再求和")
    if n == sum(kept) and n != lost:
        raise NotYet("这是还剩下的答案 token 数; 要的是丢掉的: 全部答案 token 数减去它")
    raise NotYet(f"对每一行: labels = ([-100] * len(prompt_ids) + answer_ids)[:{cut_length}], answer_ids 是答案 + "
                 "结束符; 丢掉的是 len(answer_ids) 减去 labels 里不是 -100 的个数, "
                 "对所有行求和 (第 6 节的 kept 和 answers)")


@exercise("02.3")
def _rows_whose_longest_candidate_is_longer(answer, *, out_dir, tokenizer, **_):
    """Training rows whose longest candidate takes more tokens than their own answer: rows for which the rule
    reserves more room than the answer needs."""
    from .tokenization import label_ids

    n = as_integer(answer, "answer_3")
    rows = run_rows(out_dir, "train")
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
        raise NotYet("这是答案本身超过 1 个 token 的行数; 要比较的是每行最长的候选和这一行自己的答案")
    if n == any_multi and n != expected:
        raise NotYet("这是有多 token 候选的行数; 其中答案本身就是最长候选的行, 预算恰好够用, 不算")
    raise NotYet("对每一行: max(len(label_ids(tokenizer, c)) for c in row['category']) > "
                 "len(label_ids(tokenizer, row['output'])) 的行有几行")
