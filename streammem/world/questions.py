"""OVBench-shaped multiple-choice questions about a StreamWorld stream, from ground truth.

Questions are made from a pixel-free :class:`~streammem.world.world.Simulator` run of the
same world, so thousands come in seconds. Memory stays bounded: a window of recent object
snapshots (``back_s + future_s`` seconds), a bounded event log, and a set of the (colour,
class) descriptions seen so far.

Six types, as OVBench (``answer_type`` / ``sub_answer_type``):

- ``PM`` past memory: PM-1 what colour an object turned, PM-2 which object vanished,
  PM-3 which object appeared (all about events at ``event_time`` that happened in view).
- ``SP`` spatial perception, at the query time: SP-1 the image quadrant of an object, SP-2 how
  many objects of a class are in view, SP-3 whether A is left or right of B.
- ``TP`` temporal perception: TP-1 which of two events came first, TP-2 how long ago an
  event happened (in buckets).
- ``STP`` spatio-temporal: STP-1 the direction an object moved in the image over the last
  ``back_s`` seconds, STP-2 the side of the image an object entered from.
- ``HD`` hallucination: HD-1 has a (colour, class) been seen at all (yes / no), HD-2 is a class
  in view now (yes / no).
- ``FP`` future prediction: FP-1 the quadrant an object will be in after ``future_s`` seconds
  if the camera held still; asked only when the object's motion over that time is its plain
  linear continuation (no bounce, stop or collision), so the answer is both predictable from
  the past and true.

"Needle" questions (``needle: True``, sub type ``PM-N``) ask about an event a controlled time
(``horizon_s``) before the query, for memory-horizon curves.

Every question needs only the stream up to ``middle_frame_timestamp`` (FP: plus the
deterministic continuation). Each carries ``evidence`` (track ids, event frames) so tests and
evaluators can check it against the per-frame ground truth.

"In view" means the object's centre projects inside the image.

Example:
    >>> from streammem.world import World
    >>> qs = World(seed=0, preset="medium", size=128, seconds=60).questions(every_s=10)
    >>> sorted(qs[0])[:4], len({q["answer_type"] for q in qs}) >= 4
    (['answer', 'answer_letter', 'answer_type', 'candidates'], True)
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from .objects import CLASSES, COLOUR_NAMES, TINTABLE
from .scene import CameraState, plane_to_image

__all__ = ["generate", "QUADRANTS", "AGE_BUCKETS", "describe"]

QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
AGE_BUCKETS = [(0, 5, "less than 5 seconds ago"), (5, 15, "5 to 15 seconds ago"),
               (15, 45, "15 to 45 seconds ago"), (45, 1e18, "more than 45 seconds ago")]
DIRECTIONS = ["left", "right", "up", "down"]
SIDES = ["left", "right", "top", "bottom"]
_VERB = {"changes_colour": "change colour", "appears": "appear", "disappears": "vanish",
         "enters": "come into view", "leaves": "leave the view", "collides": "bump into something"}


_PAST = {"changes_colour": "changed colour", "appears": "appeared", "disappears": "vanished",
         "enters": "came into view", "leaves": "left the view", "collides": "bumped into something"}


def _who(e: dict) -> str:
    """The object of an event as it looked just before the event."""
    return describe(e["from"] if e["type"] == "changes_colour" else e["colour"], e["class_name"])


def _said(e: dict) -> str:
    return f"{_who(e)} {_PAST[e['type']]}"


def describe(colour: str, class_name: str) -> str:
    """'the red star', 'the cat'."""
    return f"the {colour} {class_name}" if colour != "natural" else f"the {class_name}"


@dataclass
class _Snap:
    index: int
    t: float
    cam: CameraState
    tid: np.ndarray
    cls: np.ndarray
    colour: list
    pos: np.ndarray
    vel: np.ndarray
    moving: np.ndarray
    present: np.ndarray
    in_view: np.ndarray
    uv: np.ndarray


def _quadrant(u: float, v: float, hw: tuple[int, int]) -> int:
    h, w = hw
    return int(v >= h / 2) * 2 + int(u >= w / 2)


def _near_quadrant_edge(u: float, v: float, hw: tuple[int, int], margin: float = 0.08) -> bool:
    h, w = hw
    return abs(u - w / 2) < margin * w or abs(v - h / 2) < margin * h


def _side(x: float, y: float, hw: tuple[int, int]) -> int:
    h, w = hw
    return int(np.argmin([x, w - x, y, h - y]))


class _Builder:
    def __init__(self, world, rng: np.random.Generator):
        self.world = world
        self.rng = rng
        self.video = f"world_seed{world.seed}_{world.preset}"
        self.out: list[dict] = []

    def add(self, q: int, t: float, atype: str, sub: str, question: str, answer: str, distractors: list[str],
            event_time: float, evidence: dict, n_options: int = 4, **extra) -> None:
        pool = [d for d in dict.fromkeys(distractors) if d != answer]
        if not pool:
            return
        k = min(n_options - 1, len(pool))
        picks = [pool[i] for i in self.rng.choice(len(pool), k, replace=False)]
        cands = picks + [answer]
        self.rng.shuffle(cands)
        letter = "ABCDE"[cands.index(answer)]
        d = {
            "id": f"{self.video}-{len(self.out)}",
            "video": self.video,
            "fps": self.world.fps,
            "start": 0.0,
            "end": round(t, 4),
            "middle_frame_timestamp": round(t, 4),
            "query_frame": q,
            "question": question,
            "candidates": cands,
            "options": "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(cands)),
            "answer": answer,
            "answer_letter": letter,
            "answer_type": atype,
            "sub_answer_type": sub,
            "event_time": round(event_time, 4),
            "horizon_s": round(t - event_time, 4),
            "needle": False,
            "evidence": evidence,
        }
        d.update(extra)
        self.out.append(d)


def generate(
    world,
    every_s: float = 10.0,
    warmup_s: float = 4.0,
    back_s: float = 2.0,
    future_s: float = 1.0,
    needle_horizons: tuple[float, ...] = (2, 5, 10, 20, 40, 80, 160, 320),
    seconds: float | None = None,
    max_events: int = 4096,
) -> list[dict]:
    """Questions at query times ``warmup_s + k * every_s`` over the world's length.

    ``seconds`` sets the length for an endless world. Returns a list of OVBench-shaped dicts
    (see the module docstring), options shuffled with the world's seed.
    """
    fps = world.fps
    n = world.num_frames if seconds is None else int(round(seconds * fps))
    if n is None:
        raise ValueError("the world is endless: give seconds= to generate questions")
    hw = world.size_hw
    sim = world.simulator()
    rng = np.random.default_rng([world.seed, 303])
    b = _Builder(world, rng)
    L = max(1, int(round(future_s * fps)))
    B = max(1, int(round(back_s * fps)))
    every = max(1, int(round(every_s * fps)))
    first = max(B, int(round(warmup_s * fps)))
    snaps: deque[_Snap] = deque(maxlen=B + L + 1)
    events: deque[dict] = deque(maxlen=max_events)
    seen: dict[tuple[str, str], float] = {}  # (colour, class) -> first time in view
    ob = sim.objects
    for f in range(n):
        sf = sim.step()
        uv, _ = sim.project()
        s = _Snap(f, sf.timestamp, sf.cam, ob.tid.copy(), ob.cls.copy(),
                  [ob.colour_name(i) for i in range(ob.n)], ob.pos.copy(), ob.vel.copy(),
                  ob.moving.copy(), ob.present.copy(), sim.in_view.copy(), uv)
        snaps.append(s)
        events.extend(sf.events)
        for i in np.nonzero(s.in_view)[0]:
            seen.setdefault((s.colour[i], CLASSES[s.cls[i]]), s.t)
        q = f - L
        if q >= first and (q - first) % every == 0 and len(snaps) == snaps.maxlen:
            _questions_at(b, list(snaps), B, events, seen, hw, needle_horizons, future_s)
    return b.out


def _questions_at(b: _Builder, snaps: list[_Snap], B: int, events, seen, hw, horizons, future_s) -> None:
    now, past, fut = snaps[B], snaps[0], snaps[-1]
    q, t = now.index, now.t
    rng = b.rng
    past_ev = [e for e in events if e["time"] <= t]
    vis = [i for i in np.nonzero(now.in_view)[0]]
    descs = {i: describe(now.colour[i], CLASSES[now.cls[i]]) for i in vis}
    counts: dict[str, int] = {}
    for d in descs.values():
        counts[d] = counts.get(d, 0) + 1
    unique_vis = [i for i in vis if counts[descs[i]] == 1]
    all_desc = sorted({describe(c, k) for c in COLOUR_NAMES for k in TINTABLE} | {describe("natural", k) for k in CLASSES if k not in TINTABLE})

    # ---- PM: events that happened in view
    def event_q(e: dict, sub: str, needle: bool = False, horizon: float | None = None) -> None:
        desc_then = describe(e["colour"], e["class_name"])
        extra = {"needle": True, "target_horizon_s": horizon} if needle else {}
        sub_id = "PM-N" if needle else sub
        ev = {"events": [{"type": e["type"], "track_id": e["track_id"], "frame": e["frame"]}]}
        if e["type"] == "changes_colour":
            desc_before = describe(e["from"], e["class_name"])
            b.add(q, t, "PM", sub_id, f"At about {e['time']:.1f}s, {desc_before} changed colour. What colour did it become?",
                  e["to"], [c for c in COLOUR_NAMES if c not in (e["to"], e["from"])], e["time"], ev, **extra)
        elif e["type"] in ("disappears", "appears"):
            verb = "vanished" if e["type"] == "disappears" else "appeared"
            b.add(q, t, "PM", sub_id, f"Which object {verb} at about {e['time']:.1f}s?", desc_then,
                  [d for d in all_desc if d != desc_then], e["time"], ev, **extra)

    pm = [e for e in past_ev if e["in_view"] and e["type"] in ("changes_colour", "disappears", "appears")]
    # unambiguous: no other event of the same type within 3 s
    times: dict[str, np.ndarray] = {}
    for typ in ("changes_colour", "disappears", "appears"):
        times[typ] = np.array([x["time"] for x in past_ev if x["type"] == typ])
    pm = [e for e in pm if int(np.sum(np.abs(times[e["type"]] - e["time"]) < 3)) == 1]
    for typ, sub in (("changes_colour", "PM-1"), ("disappears", "PM-2"), ("appears", "PM-3")):
        cands = [e for e in pm if e["type"] == typ]
        if cands:
            event_q(cands[int(rng.integers(len(cands)))], sub)
    # needles: the informative in-view event nearest to t - horizon (within 25% of it)
    for hz in horizons:
        if hz >= t:
            continue
        best = min(pm, key=lambda e: abs((t - e["time"]) - hz), default=None)
        if best is not None and abs((t - best["time"]) - hz) <= 0.25 * hz + 0.5:
            event_q(best, "PM-N", needle=True, horizon=hz)

    # ---- SP
    if unique_vis:
        i = unique_vis[int(rng.integers(len(unique_vis)))]
        u, v = now.uv[i]
        if not _near_quadrant_edge(u, v, hw):
            b.add(q, t, "SP", "SP-1", f"Where in the frame is {descs[i]} now?", QUADRANTS[_quadrant(u, v, hw)],
                  QUADRANTS, t, {"track_ids": [int(now.tid[i])]})
    cls_vis = [CLASSES[now.cls[i]] for i in vis]
    if cls_vis:
        k = cls_vis[int(rng.integers(len(cls_vis)))]
        c = cls_vis.count(k)
        b.add(q, t, "SP", "SP-2", f"How many {k} objects are in view now?", str(c),
              [str(x) for x in range(max(0, c - 2), c + 4)], t,
              {"track_ids": [int(now.tid[i]) for i in vis if CLASSES[now.cls[i]] == k]})
    if len(unique_vis) >= 2:
        i, j = (unique_vis[x] for x in rng.choice(len(unique_vis), 2, replace=False))
        du = now.uv[i][0] - now.uv[j][0]
        if abs(du) > 0.1 * hw[1]:
            b.add(q, t, "SP", "SP-3", f"Is {descs[i]} to the left or to the right of {descs[j]}?",
                  "left" if du < 0 else "right", ["left", "right"], t,
                  {"track_ids": [int(now.tid[i]), int(now.tid[j])]}, n_options=2)

    # ---- TP
    tp = [e for e in past_ev if e["in_view"] and e["type"] in _VERB]
    if len(tp) >= 2:
        e1, e2 = (tp[x] for x in rng.choice(len(tp), 2, replace=False))
        s1, s2 = _said(e1), _said(e2)
        if abs(e1["time"] - e2["time"]) >= 2.0 and s1 != s2:
            first, second = (s1, s2) if e1["time"] < e2["time"] else (s2, s1)
            b.add(q, t, "TP", "TP-1", "Which happened first?", first, [second], min(e1["time"], e2["time"]),
                  {"events": [{"type": e["type"], "track_id": e["track_id"], "frame": e["frame"]} for e in (e1, e2)]},
                  n_options=2)
    said_count = Counter((_who(x), x["type"]) for x in past_ev if x["type"] in ("changes_colour", "appears", "disappears"))
    ok = [e for e in tp if e["type"] in ("changes_colour", "appears", "disappears")
          and all(abs((t - e["time"]) - edge) >= 1.0 for edge in (5, 15, 45))
          and said_count[(_who(e), e["type"])] == 1]
    if ok:
        e = ok[int(rng.integers(len(ok)))]
        age = t - e["time"]
        ans = next(lbl for lo, hi, lbl in AGE_BUCKETS if lo <= age < hi)
        b.add(q, t, "TP", "TP-2", f"When did {_who(e)} {_VERB[e['type']]}?", ans, [x[2] for x in AGE_BUCKETS],
              e["time"], {"events": [{"type": e["type"], "track_id": e["track_id"], "frame": e["frame"]}]})

    # ---- STP
    moved = []
    for i in unique_vis:
        tid = now.tid[i]
        j = np.nonzero((past.tid == tid) & past.present)[0]
        if len(j) == 0:
            continue
        d = now.uv[i] - past.uv[j[0]]
        if np.hypot(*d) > 0.08 * min(hw) and max(abs(d)) > 2.5 * min(abs(d)):
            moved.append((i, d))
    if moved:
        i, d = moved[int(rng.integers(len(moved)))]
        ans = (("right" if d[0] > 0 else "left") if abs(d[0]) > abs(d[1]) else ("down" if d[1] > 0 else "up"))
        b.add(q, t, "STP", "STP-1", f"Which way has {descs[i]} moved in the picture over the last {now.t - past.t:.0f} seconds?",
              ans, DIRECTIONS, past.t, {"track_ids": [int(now.tid[i])], "frames": [past.index, now.index]})
    ent = [e for e in past_ev if e["type"] == "enters" and t - e["time"] <= 20]
    if ent:
        e = ent[int(rng.integers(len(ent)))]
        x, y = e["x"], e["y"]
        h, w = hw
        dists = sorted([x, w - x, y, h - y])
        if dists[1] - dists[0] > 0.05 * min(hw):
            b.add(q, t, "STP", "STP-2",
                  f"From which side of the picture did {describe(e['colour'], e['class_name'])} come into view at about {e['time']:.1f}s?",
                  SIDES[_side(x, y, hw)], SIDES, e["time"],
                  {"events": [{"type": "enters", "track_id": e["track_id"], "frame": e["frame"]}]})

    # ---- HD
    combos = [(c, k) for k in CLASSES for c in (COLOUR_NAMES if k in TINTABLE else ["natural"])]
    seen_now = [ck for ck, ts in seen.items() if ts <= t]
    unseen = [ck for ck in combos if ck not in seen_now]
    pool = seen_now if (rng.random() < 0.5 and seen_now) or not unseen else unseen
    if pool:
        c, k = pool[int(rng.integers(len(pool)))]
        ans = "yes" if (c, k) in seen_now else "no"
        b.add(q, t, "HD", "HD-1", f"Has {describe(c, k).replace('the ', 'a ', 1)} been in view at any time so far?",
              ans, ["yes", "no"], t, {"description": [c, k]}, n_options=2)
    k = CLASSES[int(rng.integers(len(CLASSES)))]
    ans = "yes" if k in cls_vis else "no"
    b.add(q, t, "HD", "HD-2", f"Is there a {k} in view now?", ans, ["yes", "no"], t,
          {"class_name": k}, n_options=2)

    # ---- FP: linear continuation, asked only when it is what really happens
    lin = []
    for i in unique_vis:
        jf = np.nonzero(fut.tid == now.tid[i])[0]
        if not len(jf) or not fut.present[jf[0]] or not now.moving[i] or not fut.moving[jf[0]]:
            continue
        if not np.allclose(fut.vel[jf[0]], now.vel[i]) or np.hypot(*now.vel[i]) * future_s < 20:
            continue
        mid_ok = all(
            (s.tid == now.tid[i]).any() and s.moving[np.nonzero(s.tid == now.tid[i])[0][0]]
            and np.allclose(s.vel[np.nonzero(s.tid == now.tid[i])[0][0]], now.vel[i])
            for s in snaps[B:]
        )
        if mid_ok:
            lin.append((i, jf[0]))
    if lin:
        i, jf = lin[int(rng.integers(len(lin)))]
        m = plane_to_image(now.cam, hw, 0.0)
        u, v = m[:, :2] @ fut.pos[jf] + m[:, 2]
        h, w = hw
        if 0 <= u < w and 0 <= v < h:
            if not _near_quadrant_edge(u, v, hw):
                ans = QUADRANTS[_quadrant(u, v, hw)]
            else:
                ans = None
        else:
            out = u < -0.05 * w or u > 1.05 * w or v < -0.05 * h or v > 1.05 * h
            ans = "out of view" if out else None
        if ans is not None:
            b.add(q, t, "FP", "FP-1",
                  f"If the camera held still, where would {descs[i]} be in {future_s:g} seconds?",
                  ans, QUADRANTS + ["out of view"], fut.t,
                  {"track_ids": [int(now.tid[i])], "frames": [now.index, fut.index], "world_xy": fut.pos[jf].tolist()},
                  n_options=4)
