"""A list of row dicts with the few ``datasets.Dataset`` methods the tokenizers call (``map``, ``select``,
``column_names``, column access): ``benchmarks/gpu.py`` uses it so that a GPU machine without the
``datasets`` package can run it (tokenization is not timed there)."""

from __future__ import annotations


class RowsDataset:
    def __init__(self, rows: list[dict]):
        self.rows = [dict(r) for r in rows]

    @classmethod
    def from_list(cls, rows):
        return cls(rows)

    @property
    def column_names(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        return self.rows[key]

    def select(self, indices):
        return RowsDataset([self.rows[i] for i in indices])

    def select_columns(self, columns):
        return RowsDataset([{c: r[c] for c in columns} for r in self.rows])

    def map(self, fn, batched: bool = False, batch_size: int = 1000, fn_kwargs=None, remove_columns=None, **_):
        """Like ``Dataset.map``: the function's output columns are added to (or replace) the row's, then
        ``remove_columns`` that the function did not return are dropped."""
        fn_kwargs, drop = fn_kwargs or {}, set(remove_columns or ())
        out = []
        if not batched:
            for row in self.rows:
                new = fn(row, **fn_kwargs)
                out.append({**{k: v for k, v in row.items() if k not in drop}, **new})
            return RowsDataset(out)
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            columns = {c: [r[c] for r in chunk] for c in chunk[0]}
            new = fn(columns, **fn_kwargs)
            n = len(next(iter(new.values())))
            kept = [{k: v for k, v in r.items() if k not in drop} for r in chunk] if n == len(chunk) else [{}] * n
            out += [{**kept[i], **{k: v[i] for k, v in new.items()}} for i in range(n)]
        return RowsDataset(out)
