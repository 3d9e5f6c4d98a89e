"""The exercises of notebooks 03 and 04, their expected values computed from the trained adapter, the tokenized rows
and ``predictions.jsonl``: 03.1 how far Adam moves a LoRA weight at the recipe's learning rate, 03.2 the parameters
at rank 16, 03.3 all positions against supervised ones; 04.1 the rows LoRA fixed, 04.2 the predictions a mean
score changes, 04.3 the answers longer than one token. :mod:`qwen_cls.exercises` checks them.

Taught in: 03, 04
"""

from __future__ import annotations

import math

from .exercises_base import (
    NotYet,
    adapter_shapes,
    as_integer,
    as_number,
    as_pair,
    exercise,
    run_file,
    run_json,
    run_rows,
)
from .files import read_jsonl

# ---------------------------------------------------------------------------------------------------------------
# 03 LoRA training


@exercise("03.1")
def _movement_at_recipe_lr(answer, *, out_dir, **_):
    """How far Adam can move one LoRA weight in this run's steps at the recipe's learning rate 1e-4."""
    value = as_number(answer, "answer_1")
    config = run_json(out_dir, "run_config.json")
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
        raise NotYet(f"这是这次运行的学习率 {lr:g} 的结果; 题目问的是原配方的 1e-4")
    if math.isclose(value, steps, rel_tol=0.01):
        raise NotYet("这是优化步数; 每一步最多移动约 learning_rate (1e-4), 整个训练最多移动多少?")
    raise NotYet("run_config['training']['global_step'] 是优化步数; Adam 每步最多移动约 learning_rate: "
                 "用 1e-4 时整个训练最多移动 步数 × 1e-4")


@exercise("03.2")
def _params_at_rank_16(answer, *, out_dir, **_):
    """(trainable parameters with r=16, lora_alpha / 16), from the saved adapter's shapes."""
    params, scale = as_pair(answer, "answer_2")
    params, scale = as_integer(params, "可训练参数"), as_number(scale, "alpha / r")
    shapes = adapter_shapes(run_file(out_dir, "adapter"))
    lora = run_json(out_dir, "run_config.json")["lora"]
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
        raise NotYet(f"{now:,} 是 r = {lora['r']} 时的参数 (上面 print_trainable_parameters 的数); 每层 "
                     "r × (d_in + d_out), r 变成 16 时是多少?")
    if params != expected:
        raise NotYet("可训练参数不对: 每个 LoRA 层有 A (r × d_in) 和 B (d_out × r), 共 r × (d_in + d_out); "
                     "对所有层求和 (形状见第 2 节的 lora_layers 或 adapter/adapter_model.safetensors)")
    raise NotYet(f"缩放系数不对: lora_alpha 不变 ({lora['lora_alpha']}), r = 16")


@exercise("03.3")
def _lm_head_positions_ratio(answer, *, out_dir, **_):
    """All positions of the training rows / positions whose next token is supervised."""
    from datasets import load_from_disk

    from .tokenization import IGNORE_INDEX

    value = as_number(answer, "answer_3")
    data = load_from_disk(str(run_file(out_dir, "tokenized", "train")))
    positions = sum(data["length"])
    answer_positions = sum(sum(t != IGNORE_INDEX for t in labels) for labels in data["labels"])
    expected = positions / answer_positions
    if abs(value - expected) <= 0.051:  # rounded to one decimal
        return (f"{positions:,} 个位置 / {answer_positions:,} 个答案位置 ≈ {expected:.1f} 倍: 普通 Trainer 在每个位置都"
                "算整个词表的 logits, 绝大部分直接丢掉; loss 相同 (第 5 节验证过), 只是计算量不同。用普通 Trainer "
                "真的训练一遍比较速度, 见 solutions 里的代码。")
    if expected > 1 and abs(value - 1 / expected) <= 0.01:
        raise NotYet("倒过来了: 要的是 全部位置 / 答案位置 (大于 1)")
    if abs(value - positions / len(data)) <= 0.51:
        raise NotYet("这是平均每行的 token 数; 再除以平均每行计算 loss 的 token 数 (labels != -100)")
    raise NotYet("全部位置 = sum(train_dataset['length']); 答案位置 = 所有行里 labels != -100 的个数; "
                 "答案写 全部位置 / 答案位置")


# ---------------------------------------------------------------------------------------------------------------
# 04 evaluation


@exercise("04.1")
def _fixed_by_lora(answer, *, out_dir, **_):
    """Test rows LoRA gets right and zero-shot (the same model, adapter off) gets wrong, from ``predictions.jsonl``
    (zero-shot's prediction: the candidate with the highest ``zero_shot_scores``)."""
    n = as_integer(answer, "answer_1")
    rows = read_jsonl(run_file(out_dir, "predictions.jsonl"))
    zero = [max(r["zero_shot_scores"], key=r["zero_shot_scores"].get) for r in rows]
    lora_right = [r["prediction"] == r["output"] for r in rows]
    zero_right = [z == r["output"] for z, r in zip(zero, rows)]
    fixed = sum(a and not b for a, b in zip(lora_right, zero_right))
    broken = sum(b and not a for a, b in zip(lora_right, zero_right))
    if n == fixed:
        return (f"{fixed} 行: LoRA 答对而 zero-shot 答错; 反过来 (LoRA 答错而 zero-shot 答对) 有 {broken} 行。"
                f"accuracy 之差 = ({fixed} − {broken}) / {len(rows)}: 微调不只是纠正错误, 也会把原来对的行改错。")
    if n == broken and fixed != broken:
        raise NotYet("反过来了: 这是 zero-shot 答对而 LoRA 答错的行数; 要的是 prediction == output 而 zero-shot "
                     "的预测 != output")
    if n == fixed - broken and broken:
        raise NotYet("这是两者答对行数之差 (净增加); 有的行 LoRA 反而答错了, 只数 LoRA 对、zero-shot 错的行")
    if n == sum(lora_right) and n != fixed:
        raise NotYet("这是 LoRA 答对的全部行数; 其中 zero-shot 也答对的行不算")
    raise NotYet("读 out_dir / 'predictions.jsonl': zero-shot 的预测是 zero_shot_scores 里分数最高的候选, "
                 "数 prediction == output 且 zero-shot 的预测 != output 的行")


@exercise("04.2")
def _changed_by_mean_score(answer, *, out_dir, tokenizer, **_):
    """Rows whose prediction changes when each candidate's score is divided by its tokens + end token."""
    from .tokenization import label_ids

    n = as_integer(answer, "answer_2")
    rows = read_jsonl(run_file(out_dir, "predictions.jsonl"))

    def changed(extra: int) -> int:
        mean = [max(r["scores"], key=lambda c: r["scores"][c] / (len(label_ids(tokenizer, c)) + extra)) for r in rows]
        return sum(m != r["prediction"] for m, r in zip(mean, rows))

    expected = changed(1)
    if n == expected:
        return (f"{n}/{len(rows)} 行的预测变了。平均值偏向 token 多的长标签 (后面的 token 往往很好猜); 总和就是"
                "“写出整个答案并停下”的概率, 是更自然的规则。")
    if n == len(rows) - expected:
        raise NotYet("这是预测没变的行数; 要的是变了的")
    if n == changed(0) and changed(0) != expected:
        raise NotYet("分母要加上结束符: score / (标签的 token 数 + 1)")
    raise NotYet("对每行: mean = max(scores, key=lambda c: scores[c] / (len(label_ids(tokenizer, c)) + 1)), "
                 "再数 mean != prediction 的行")


@exercise("04.3")
def _answers_longer_than_one_token(answer, *, out_dir, tokenizer, **_):
    """Test rows whose answer takes more than 1 token (end token not counted): ``max_new_tokens = 1`` cannot
    write it."""
    from .tokenization import label_ids

    n = as_integer(answer, "answer_3")
    rows = run_rows(out_dir, "test")
    expected = sum(len(label_ids(tokenizer, r["output"])) > 1 for r in rows)
    if n == expected:
        longest = max({r["output"] for r in rows}, key=lambda label: len(label_ids(tokenizer, label)))
        return (f"{n}/{len(rows)} 行: 这些答案一个 token 写不完, 生成一定无效 (最长的标签 {longest!r} 有 "
                f"{len(label_ids(tokenizer, longest))} 个 token)。候选打分不生成 token, 直接算每个完整候选的概率, "
                "所以不受 max_new_tokens 影响, 预测也永远是合法标签。")
    if n == len(rows) and expected < n:
        raise NotYet("不算结束符: 只数标签本身的 token (label_ids(tokenizer, output))")
    if n == sum(any(len(label_ids(tokenizer, c)) > 1 for c in r["category"]) for r in rows):
        raise NotYet("只看每行的正确答案 output, 不是所有候选")
    raise NotYet("对 test_rows 的每一行数 len(label_ids(tokenizer, row['output'])) > 1 的行")
