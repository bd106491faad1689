"""Re-fit the answerer's event head on worlds it was not trained on.

The event head (``SmallAnswerer(event_head=True)``) adds each candidate's signed-time evidence
``feats (C, 8)`` to its logit, dotted with a gate read from the question's ``[CLS]`` state; a
``calibrated`` answerer also scales the blocks' logits by ``softplus(w . [CLS, support] + b)``
and adds ``U support`` to the gate (``SmallAnswerer._event_logits`` is the one place the sum is
written). Those parts are small (the gate 1,032 weights at ``d = 128``; the scale and the
support term 131 + 16) and are fitted here with everything else frozen: the frozen model runs
once over snapshot shards (:func:`event_gate_data`), then full-batch L-BFGS minimises the
cross-entropy plus an L2 pull towards the starting weights (:func:`fit_event_gate`).

The shards must be worlds the answerer was not trained on: on its own training worlds the
blocks' logits are right far more often than on new ones, and the gate would learn to trust
them. ``streammem train event-gate DATA --init CKPT --out DIR`` runs :func:`refit_event_gate`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from streammem.models.answerer import SmallAnswerer, encode_questions
from streammem.train.qa_data import _snapshot_tokens, load_shard

__all__ = ["EventGateData", "event_gate_data", "fit_event_gate", "refit_event_gate"]


@dataclass
class EventGateData:
    """What :func:`fit_event_gate` fits on, one row per question (see
    :meth:`SmallAnswerer._forward`'s ``event_parts``): the frozen model's logits before the
    event head ``base (N, C)`` (``-inf`` past a question's candidates), ``[CLS]`` states
    ``cls (N, d)``, signed features ``feats (N, C, 8)``, the right candidate ``target (N,)``, the
    memory's support around the stated time ``support (N, 2)``."""

    base: torch.Tensor
    cls: torch.Tensor
    feats: torch.Tensor
    target: torch.Tensor
    support: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)


@torch.no_grad()
def event_gate_data(model: SmallAnswerer, snaps, progress: bool = True) -> EventGateData:
    """Run the frozen ``model`` over ``snaps`` (an iterable of :class:`Snapshot`) and keep what
    its event head's gate reads, per question."""
    if not model.event_head:
        raise ValueError("event_gate_data needs an answerer with the event head (event_head=True)")
    model.eval()
    parts: list = []
    targets = []
    for s in tqdm(snaps, desc="event-gate data", unit="snapshot", disable=not progress):
        qs = s.questions
        batch = encode_questions(model.vocab, [q["question"] for q in qs], [q["candidates"] for q in qs],
                                 [s.query_time] * len(qs), model.max_len, model.max_cand)
        got: list = []
        model._forward(_snapshot_tokens(s), batch, event_parts=got)
        if not got:  # an empty memory: the head adds nothing, the question teaches the gate nothing
            continue
        base, cls, feats, support = got[0]
        valid = torch.arange(model.max_cand)[None] < batch.n_cand[:, None]
        parts.append((base.masked_fill(~valid, float("-inf")), cls, feats, support))
        targets += [q["candidates"].index(q["answer"]) for q in qs]
    if not parts:
        raise ValueError("event_gate_data: no question had a memory to read")
    base, cls, feats, support = (torch.cat(x) for x in zip(*parts))
    return EventGateData(base, cls, feats, torch.tensor(targets), support)


def fit_event_gate(model: SmallAnswerer, data: EventGateData, weight_decay: float = 0.1, iters: int = 300,
                   val: EventGateData | None = None) -> dict:
    """Re-fit only the event head's gate (``model.event_gate``: 1,032 weights at d = 128) and,
    for a ``calibrated`` answerer, the scale of the blocks' logits and the gate's support term
    (``model.base_scale``, ``model.support_gate``: 131 + 16), by full-batch L-BFGS on the
    cross-entropy of ``scale(cls, support) * base + feats . (gate(cls) + U support)``;
    everything else stays frozen. ``weight_decay``: L2 pull of every fitted weight towards
    where it started (for a first calibration: the scale at 1, the support term at 0); the
    default 0.1 is the value chosen by cross-validation over held-out worlds (see the answerer's
    model card). ``val``: data to report on, not fitted.
    Returns ``{"before" | "after": {"train" | "val": (loss, accuracy)}}``."""
    modules = [model.event_gate, *([model.base_scale, model.support_gate] if model.calibrated else [])]
    params = [p for m in modules for p in m.parameters()]
    start = [p.detach().clone() for p in params]

    def logits_of(d: EventGateData) -> torch.Tensor:
        # the model's own event-head sum; -inf marks absent candidates: kept out of the product's gradient
        absent = torch.isinf(d.base)
        out = model._event_logits(d.base.masked_fill(absent, 0.0), d.cls, d.feats, d.support)
        return out.masked_fill(absent, float("-inf"))

    def loss_acc(d: EventGateData) -> tuple[float, float]:
        with torch.no_grad():
            logits = logits_of(d)
            return float(F.cross_entropy(logits, d.target)), float((logits.argmax(-1) == d.target).float().mean())

    report = {"before": {"train": loss_acc(data)}}
    if val is not None:
        report["before"]["val"] = loss_acc(val)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits_of(data), data.target)
        loss = loss + weight_decay * sum((p - p0).square().sum() for p, p0 in zip(params, start))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    report["after"] = {"train": loss_acc(data)}
    if val is not None:
        report["after"]["val"] = loss_acc(val)
    return report


def refit_event_gate(init: str | Path, data: str | Path, out: str | Path, weight_decay: float = 0.1,
                     iters: int = 300, threads: int = 2, calibrate: bool = True, progress: bool = True) -> dict:
    """Load the answerer at ``init`` (made ``calibrated`` when ``calibrate``: the scale starts at
    1), re-fit its event gate and scale (:func:`fit_event_gate`) on the snapshot shards in
    ``data/train`` (validated on ``data/val`` when it has shards) and save the result to
    ``out``, with ``init``'s ``training.json`` plus an ``event_gate_refit`` record. The shards
    must be worlds ``init`` was not trained on: on its own training worlds the blocks' logits
    are right far more often than on new ones and would teach the gate to trust them."""
    root = Path(data)
    if not any((root / "train").glob("*.safetensors")):
        raise ValueError(f"{root / 'train'} holds no snapshot shards (streammem train qa-snapshots)")
    cfg_path = Path(init) / "config.json"
    if not calibrate and cfg_path.is_file() and json.loads(cfg_path.read_text()).get("calibrated"):
        raise ValueError(f"{init} is already calibrated: its scale and support term are refitted with the gate "
                         "(calibrate=True)")
    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # a first calibration: the scale is new, starting at 1, as it should
        warnings.filterwarnings("ignore", message=r".*left at their initial values: base_scale\.bias, "
                                                  r"base_scale\.weight, support_gate\.weight$")
        model = SmallAnswerer.from_pretrained(str(init), **({"calibrated": True} if calibrate else {}))

    def collect(split: str) -> tuple[EventGateData | None, int]:
        paths = sorted((root / split).glob("*.safetensors"))
        if not paths:
            return None, 0
        snaps = (s for p in paths for s in load_shard(p, model.memory_pool))  # one shard in memory at a time
        return event_gate_data(model, snaps, progress=progress), len(paths)

    train_data, n_train = collect("train")
    val_data, n_val = collect("val")
    report = fit_event_gate(model, train_data, weight_decay=weight_decay, iters=iters, val=val_data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    prev = Path(init) / "training.json"
    summary = json.loads(prev.read_text()) if prev.is_file() else {}
    summary["event_gate_refit"] = {
        "init": str(init), "data": str(root), "train_shards": n_train, "train_questions": len(train_data),
        "val_shards": n_val, "val_questions": len(val_data) if val_data is not None else 0,
        "weight_decay": weight_decay, "iters": iters, "calibrated": model.calibrated,
        "loss_accuracy": {k: {split: [round(v, 4) for v in la] for split, la in r.items()} for k, r in report.items()},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    return report
