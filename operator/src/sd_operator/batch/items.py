"""A GenerationBatch's work as numbered tasks: inline or JSON Lines items, then sweep cells.

Indexes are the batch's identity for resume (file names start with them), so they depend only on the
spec and the items file: items first, each taking `count` consecutive indexes, then the sweep cells in
prompts x loraWeights x seeds x cfgScales order. A JSON Lines file is read twice and never held in
memory: once to count (the total is known before work starts), then lazily while workers take tasks.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from pydantic import ValidationError

from sd_operator.api.generation import GenerationParams, LoRAUse
from sd_operator.api.generationbatch import GenerationBatchSpec, Item

SEED_SPACE = 2**32
Done = Callable[[int], bool]


class ItemsError(ValueError):
    """The batch's items cannot be read at all (not one bad line: that fails only its item)."""


@dataclass(frozen=True)
class Task:
    """One item to render: index, the seed its file is named by, and merged parameters (or why it cannot run)."""

    index: int
    seed: int
    params: Item | None
    error: str | None = None
    line: int | None = None


def derived_seed(uid: str, index: int) -> int:
    """A seed in [0, 2^32) from the batch's uid and an index.

    A seed of -1 lets the backend pick a random one, so a retried or resumed item would render another
    image than its first attempt did (and never hit the gateway's cache). Hashing (uid, index) instead
    gives every item its own seed that stays the same across retries, restarts and pods.
    """
    digest = hashlib.sha256(f"{uid}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def merge(defaults: GenerationParams | None, item: Item) -> Item:
    """The item with every parameter it leaves unset taken from the batch's defaults (whole fields: an
    item's loras or controlNets list replaces the defaults' list)."""
    if defaults is None:
        return item
    updates = {
        name: value
        for name in GenerationParams.model_fields
        if getattr(item, name) is None and (value := getattr(defaults, name)) is not None
    }
    return item.model_copy(update=updates) if updates else item


def parse_line(raw: bytes) -> Item | str | None:
    """One JSON Lines line: an Item, None for a blank or '#' comment line, or why the line is unusable."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if not text or text.startswith("#"):
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    try:
        return Item.model_validate(data)
    except ValidationError as e:
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors())


def _seed(item: Item, k: int, uid: str, index: int) -> int:
    if item.seed is not None and item.seed >= 0:
        return item.seed + k
    return derived_seed(uid, index)


class ItemSource:
    """The tasks of one batch; `total` is known on construction, tasks are produced on demand."""

    def __init__(self, spec: GenerationBatchSpec, uid: str, items_file: Path | None = None) -> None:
        self.spec, self.uid = spec, uid
        items = spec.items
        self.items_file: Path | None = None
        if items is not None and (items.config_map is not None or items.file is not None):
            if items_file is None:
                raise ItemsError("spec.items names a ConfigMap or a file: pass --items-file where it is mounted")
            self.items_file = items_file
        # Indexes each line of the items file takes (0: blank or comment): 4 bytes a line, so the second
        # pass can skip finished lines without parsing them again.
        self._line_counts = array("I")
        self.item_total = self._count_items()
        self.sweep_total = self._count_sweep()
        self.total = self.item_total + self.sweep_total

    def _count_items(self) -> int:
        if self.items_file is not None:
            try:
                with self.items_file.open("rb") as f:
                    for raw in f:
                        parsed = parse_line(raw)
                        # A bad line still takes one index, so it can be reported as a failed item.
                        count = 0 if parsed is None else 1 if isinstance(parsed, str) else parsed.count or 1
                        self._line_counts.append(count)
            except OSError as e:
                raise ItemsError(f"cannot read the items file {self.items_file}: {e}") from e
            return sum(self._line_counts)
        inline = self.spec.items.inline if self.spec.items else None
        return sum(item.count or 1 for item in inline or [])

    def _count_sweep(self) -> int:
        sweep = self.spec.sweep
        if sweep is None:
            return 0
        if sweep.lora_weights and not sweep.lora:
            raise ItemsError("spec.sweep.loraWeights needs spec.sweep.lora (the LoRA whose weight is swept)")
        n = len(sweep.prompts)
        for values in (sweep.lora_weights, sweep.seeds, sweep.cfg_scales):
            n *= len(values or [None])
        return n

    def tasks(self, done: Done = lambda _: False) -> Iterator[Task]:
        """Tasks in index order, leaving out those `done` says are finished."""
        yield from self._item_tasks(done)
        yield from self._sweep_tasks(done)

    def _expand(self, item: Item, start: int, done: Done, line: int | None) -> Iterator[Task]:
        merged = merge(self.spec.defaults, item)
        for k in range(item.count or 1):
            index = start + k
            if not done(index):
                seed = _seed(merged, k, self.uid, index)
                yield Task(index, seed, merged.model_copy(update={"seed": seed, "count": None}), line=line)

    def _item_tasks(self, done: Done) -> Iterator[Task]:
        index = 0
        if self.items_file is None:
            inline = self.spec.items.inline if self.spec.items else None
            for item in inline or []:
                yield from self._expand(item, index, done, None)
                index += item.count or 1
            return
        with self.items_file.open("rb") as f:
            for line_no, (raw, count) in enumerate(zip(f, self._line_counts, strict=False), 1):
                if count == 0 or all(done(i) for i in range(index, index + count)):
                    index += count
                    continue
                parsed = parse_line(raw)
                if isinstance(parsed, Item):
                    yield from self._expand(parsed, index, done, line_no)
                else:
                    why = parsed or "the line changed while the batch ran"
                    yield Task(index, derived_seed(self.uid, index), None, f"line {line_no}: {why}", line_no)
                index += count

    def _sweep_tasks(self, done: Done) -> Iterator[Task]:
        sweep = self.spec.sweep
        if sweep is None:
            return
        index = self.item_total
        # An axis that is not swept is one unset value, so every cell has all four coordinates.
        weights: list[float | None] = [*sweep.lora_weights] if sweep.lora_weights else [None]
        seeds: list[int | None] = [*sweep.seeds] if sweep.seeds else [None]
        cfgs: list[float | None] = [*sweep.cfg_scales] if sweep.cfg_scales else [None]
        row = len(weights) * len(seeds) * len(cfgs)
        for p, (prompt, weight, given, cfg) in enumerate(product(sweep.prompts, weights, seeds, cfgs)):
            cell = index + p
            if done(cell):
                continue
            item = merge(self.spec.defaults, Item(prompt=prompt))
            seed = given if given is not None and given >= 0 else item.seed
            if seed is None or seed < 0:
                # Without an explicit seed the whole row of a prompt shares one, derived from the row's first
                # index: the cells then differ only in the swept LoRA weight / CFG, which is what a grid compares.
                seed = derived_seed(self.uid, cell - p % row)
            loras = [lo for lo in item.loras or [] if lo.name != sweep.lora]
            if sweep.lora:
                loras.append(LoRAUse(name=sweep.lora) if weight is None else LoRAUse(name=sweep.lora, weight=weight))
            update: dict[str, object] = {"seed": seed, "loras": loras or None}
            if cfg is not None:
                update["cfg_scale"] = cfg
            yield Task(cell, seed, item.model_copy(update=update))
