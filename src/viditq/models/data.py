"""Procedural captioned scenes: images and 16-frame videos of coloured shapes, deterministic by seed.

Grammar (every caption is built from these words; see :data:`VOCABULARY`)::

    object   := "a" [texture] size colour shape                 e.g. "a small red circle"
    image    := object "at the" position "on a" bg "background"                  (one object)
              | object relation object "on a" bg "background"                    (two or three objects, chained)
    video    := object "moving" direction speed {"and" object "moving" ...} "on a" bg "background"
                ["as the camera pans" direction]

    size: small | large          colour: red green blue yellow magenta cyan    shape: circle square triangle cross
    position: top left | top | top right | left | center | right | bottom left | bottom | bottom right
    relation: left of | right of | above | below                  bg: black | gray | white
    direction: left | right | up | down                           speed: slowly (0.5 px/frame) | fast (1 px/frame)
    texture (optional): striped

Ground truth: a :class:`Scene` holds every attribute of every object (shape, colour, size, texture, position in
pixels, velocity) with objects in *canonical order* (left to right, or top to bottom), whatever order the caption
names them in ("a blue square right of a red circle" lists the circle first). Rendering (:func:`render`) is pure
torch on any device, so training can draw fresh batches on the GPU; scenes come from a ``numpy`` Generator, so
``sample_scenes(n, seed)`` is the same list on every machine.

Held-out prompts: a stable hash of the scene's attribute combination (not its positions or wording) sends 10 % of
combinations to the ``"test"`` split; training draws from ``"train"`` only, evaluation from ``"test"``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_SIZE = 32
NUM_FRAMES = 16

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # RGB in [0, 1], far apart so a probe (and a person) can name them at 32 px
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95)}
SIZES = {"small": 4.0, "large": 6.5}  # shape radius in pixels
TEXTURES = ("plain", "striped")
# Single-object positions: a 3 x 3 grid of cell centres (pixels), row-major.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GRID_CENTRES = (9.0, 16.0, 23.0)
GRID_JITTER = 1.0
RELATIONS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}
LAYOUTS = ("single", "horizontal", "vertical")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y points down
SPEEDS = {"slowly": 0.5, "fast": 1.0}  # pixels per frame
PAN_SPEED = 0.5
HELD_OUT_MODULUS = 10  # 1 in 10 attribute combinations is held out of training
# What the shipped models are trained on: images with 1-2 plain objects, videos with one moving object, no pans.
TRAINED_SCENES = {"t2i": ("image", {"max_objects": 2}), "t2v": ("video", {"max_objects": 1})}

# The extent of a shape beyond its radius (a triangle's apex reaches 1.15 r above its centre).
_EXTENT = 1.15
_MIN_GAP = 1.0  # pixels between neighbouring objects
_MAX_PLACEMENT_TRIES = 50

VOCABULARY = tuple(
    sorted(
        set(
            "a at the on background of moving and as camera pans above below".split()
            + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(SIZES) + ["striped"]
            + " ".join(POSITIONS).split() + " ".join(RELATIONS).split() + list(DIRECTIONS) + list(SPEEDS)
        )
    )
)


@dataclass(frozen=True)
class SceneObject:
    """One object. ``x, y``: centre in pixels at frame 0 (screen coordinates, y down).
    ``vx, vy``: on-screen velocity in pixels per frame (object motion minus camera pan); 0 for images."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    texture: str = "plain"
    direction: str | None = None  # named motion (videos)
    speed: str | None = None

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    """A captioned scene and its ground truth. ``num_frames == 1`` for images."""

    objects: tuple[SceneObject, ...]  # canonical order: left to right (horizontal) or top to bottom (vertical)
    background: str
    layout: str  # "single" | "horizontal" | "vertical"
    caption: str
    position: str | None = None  # grid cell of a single-object image
    num_frames: int = 1
    pan: str | None = None  # camera pan direction (videos)
    velocities: tuple[tuple[float, float], ...] = field(default=())  # on-screen (vx, vy) per object, px/frame

    @property
    def is_video(self) -> bool:
        return self.num_frames > 1

    def combination_key(self) -> str:
        """The attribute combination, without positions or wording: what the held-out split hashes."""
        objects = ",".join(f"{o.texture} {o.size} {o.colour} {o.shape} {o.direction} {o.speed}" for o in self.objects)
        return f"{self.layout}|{self.position}|{self.background}|{self.pan}|{objects}"

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.combination_key().encode()) % HELD_OUT_MODULUS == 0


# ------------------------------------------------------------------------------------------ captions
def _object_phrase(o: SceneObject) -> str:
    texture = "striped " if o.texture == "striped" else ""
    return f"a {texture}{o.size} {o.colour} {o.shape}"


def _motion_phrase(o: SceneObject) -> str:
    return f"{_object_phrase(o)} moving {o.direction} {o.speed}"


def _relation_caption(objects: tuple[SceneObject, ...], layout: str, reverse: bool) -> str:
    """Chain "A left of B left of C" (canonical order) or its mirror "C right of B right of A"."""
    forward_word, backward_word = ("left of", "right of") if layout == "horizontal" else ("above", "below")
    if reverse:
        return f" {backward_word} ".join(_object_phrase(o) for o in reversed(objects))
    return f" {forward_word} ".join(_object_phrase(o) for o in objects)


# ------------------------------------------------------------------------------------------ sampling
def _choice(rng: np.random.Generator, options) -> str:
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def _sample_looks(rng: np.random.Generator, n: int, texture_prob: float) -> list[tuple[str, str, str, str]]:
    """(shape, colour, size, texture) for ``n`` objects with distinct colours (so each can be told apart)."""
    colours = rng.permutation(len(COLOURS))[:n]
    names = tuple(COLOURS)
    return [
        (_choice(rng, SHAPES), names[c], _choice(rng, SIZES), "striped" if rng.random() < texture_prob else "plain")
        for c in colours
    ]


def _bounds(size: str) -> tuple[float, float]:
    reach = SIZES[size] * _EXTENT
    return reach + 0.5, IMAGE_SIZE - 0.5 - reach


def _place_chain(rng: np.random.Generator, sizes: list[str], layout: str) -> list[tuple[float, float]] | None:
    """Centres for objects in a row (horizontal) or column (vertical), canonical order; None if they don't fit.

    Neighbours are at least their reaches plus a gap apart; the spare room is split at random between the two
    ends and the gaps (Dirichlet(1)), so chains land anywhere along the axis.
    """
    reach = [SIZES[s] * _EXTENT for s in sizes]
    min_steps = [reach[i - 1] + reach[i] + _MIN_GAP for i in range(1, len(sizes))]
    lo, hi = reach[0] + 0.5, IMAGE_SIZE - 0.5 - reach[-1]
    slack = (hi - lo) - sum(min_steps)
    if slack < 0:
        return None
    spare = rng.dirichlet(np.ones(len(sizes) + 1)) * slack
    along = [lo + spare[0]]
    for i, step in enumerate(min_steps):
        along.append(along[-1] + step + spare[i + 1])
    shared = rng.uniform(*_bounds(max(sizes, key=SIZES.get)))
    across = [float(np.clip(shared + rng.uniform(-1.5, 1.5), *_bounds(s))) for s in sizes]
    if layout == "horizontal":
        return list(zip(along, across))
    return list(zip(across, along))


def sample_image_scene(rng: np.random.Generator, max_objects: int = 2, texture_prob: float = 0.0) -> Scene:
    """One image scene with 1..``max_objects`` (<= 3) objects."""
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    background = _choice(rng, BACKGROUNDS)
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(_MAX_PLACEMENT_TRIES):  # re-draw the looks (sizes) until the objects fit
        looks = _sample_looks(rng, n, texture_prob)
        if n == 1:
            cell = int(rng.integers(len(POSITIONS)))
            x = GRID_CENTRES[cell % 3] + rng.uniform(-GRID_JITTER, GRID_JITTER)
            y = GRID_CENTRES[cell // 3] + rng.uniform(-GRID_JITTER, GRID_JITTER)
            shape, colour, size, texture = looks[0]
            obj = SceneObject(shape, colour, size, float(x), float(y), texture)
            caption = f"{_object_phrase(obj)} at the {POSITIONS[cell]} on a {background} background"
            return Scene((obj,), background, "single", caption, position=POSITIONS[cell])
        layout = _choice(rng, ("horizontal", "vertical"))
        centres = _place_chain(rng, [look[2] for look in looks], layout)
        if centres is None:
            continue
        objects = tuple(
            SceneObject(shape, colour, size, float(x), float(y), texture)
            for (shape, colour, size, texture), (x, y) in zip(looks, centres)
        )
        caption = f"{_relation_caption(objects, layout, reverse=bool(rng.integers(2)))} on a {background} background"
        return Scene(objects, background, layout, caption)
    raise RuntimeError("could not place objects; this is a bug in the scene sizes")  # pragma: no cover


def _start_range(size: str, velocity: float) -> tuple[float, float]:
    """Start coordinates that keep the whole trajectory (NUM_FRAMES frames) inside the canvas."""
    lo, hi = _bounds(size)
    travel = velocity * (NUM_FRAMES - 1)
    return (lo, hi - travel) if travel >= 0 else (lo - travel, hi)


def sample_video_scene(
    rng: np.random.Generator, max_objects: int = 1, pan_prob: float = 0.0, texture_prob: float = 0.0
) -> Scene:
    """One 16-frame video scene: 1..``max_objects`` (<= 2) objects, each moving in a named direction and speed;
    optionally the camera pans (objects then move on screen by their motion minus the pan)."""
    if not 1 <= max_objects <= 2:
        raise ValueError(f"video max_objects must be 1 or 2, got {max_objects}")
    background = _choice(rng, BACKGROUNDS)
    pan = _choice(rng, DIRECTIONS) if rng.random() < pan_prob else None
    cam = np.array(DIRECTIONS[pan]) * PAN_SPEED if pan else np.zeros(2)
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(4 * _MAX_PLACEMENT_TRIES):  # two moving objects often cross paths: more tries
        objects, velocities = [], []
        for shape, colour, size, texture in _sample_looks(rng, n, texture_prob):
            direction, speed = _choice(rng, DIRECTIONS), _choice(rng, SPEEDS)
            vx, vy = np.array(DIRECTIONS[direction]) * SPEEDS[speed] - cam
            (x_lo, x_hi), (y_lo, y_hi) = _start_range(size, vx), _start_range(size, vy)
            if x_lo > x_hi or y_lo > y_hi:
                break
            x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
            objects.append(SceneObject(shape, colour, size, float(x), float(y), texture, direction, speed))
            velocities.append((float(vx), float(vy)))
        if len(objects) == n and not _videos_collide(objects, velocities):
            caption = " and ".join(_motion_phrase(o) for o in objects) + f" on a {background} background"
            if pan:
                caption += f" as the camera pans {pan}"
            return Scene(tuple(objects), background, "single", caption, None, NUM_FRAMES, pan, tuple(velocities))
    raise RuntimeError("could not place moving objects; this is a bug in the scene sizes")  # pragma: no cover


def _videos_collide(objects: list[SceneObject], velocities: list[tuple[float, float]]) -> bool:
    if len(objects) < 2:
        return False
    (a, b), (va, vb) = objects, velocities
    for t in range(NUM_FRAMES):
        dx = (a.x + va[0] * t) - (b.x + vb[0] * t)
        dy = (a.y + va[1] * t) - (b.y + vb[1] * t)
        if np.hypot(dx, dy) < (a.radius + b.radius) * _EXTENT + _MIN_GAP:
            return True
    return False


SPLITS = ("all", "train", "test")


def model_scenes(model: str, n: int, seed: int, split: str = "test") -> list[Scene]:
    """Scenes of the distribution the shipped ``model`` ("t2i" | "t2v") was trained on (held-out by default)."""
    if model not in TRAINED_SCENES:
        raise ValueError(f"model must be one of {sorted(TRAINED_SCENES)}, got {model!r}")
    kind, kwargs = TRAINED_SCENES[model]
    return sample_scenes(n, seed, kind, split, **kwargs)


def sample_scenes(n: int, seed: int, kind: str = "image", split: str = "all", **kwargs) -> list[Scene]:
    """``n`` scenes from ``numpy.random.default_rng(seed)``; ``kind``: "image" | "video"; ``split``: "all",
    "train" (held-out combinations excluded) or "test" (held-out combinations only). ``kwargs`` go to
    :func:`sample_image_scene` / :func:`sample_video_scene`."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sample = sample_image_scene if kind == "image" else sample_video_scene
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample(rng, **kwargs)
        if split == "all" or scene.held_out == (split == "test"):
            scenes.append(scene)
    return scenes


# ------------------------------------------------------------------------------------------ rendering
def pack_scenes(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Scene list → padded per-object float32 arrays (B, K) (``colour``: (B, K, 3)), cheap to ship between
    processes; :func:`render_packed` draws them."""
    if not scenes:
        raise ValueError("need at least one scene")
    frames = scenes[0].num_frames
    if any(s.num_frames != frames for s in scenes):
        raise ValueError("all scenes of a batch must have the same number of frames")
    b, k = len(scenes), max(len(s.objects) for s in scenes)
    arr = {name: np.zeros((b, k), np.float32) for name in ("shape", "radius", "x", "y", "vx", "vy", "valid", "stripe")}
    arr["colour"] = np.zeros((b, k, 3), np.float32)
    for i, scene in enumerate(scenes):
        velocities = scene.velocities or ((0.0, 0.0),) * len(scene.objects)
        for j, (o, (vx, vy)) in enumerate(zip(scene.objects, velocities)):
            arr["shape"][i, j] = SHAPES.index(o.shape)
            arr["radius"][i, j], arr["x"][i, j], arr["y"][i, j] = o.radius, o.x, o.y
            arr["vx"][i, j], arr["vy"][i, j] = vx, vy
            arr["valid"][i, j], arr["stripe"][i, j] = 1.0, float(o.texture == "striped")
            arr["colour"][i, j] = COLOURS[o.colour]
    arr["background"] = np.array([BACKGROUNDS[s.background] for s in scenes], np.float32)  # (B, 3)
    arr["pan"] = np.array([DIRECTIONS[s.pan] if s.pan else (0.0, 0.0) for s in scenes], np.float32) * PAN_SPEED
    arr["has_pan"] = np.array([s.pan is not None for s in scenes], np.float32)
    arr["num_frames"] = np.array(frames, np.int64)
    return arr


def _shape_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of each shape id at offsets (dx, dy) from its centre."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    big_r = _EXTENT * r  # triangle circumradius; apex up (y points down), inradius = big_r / 2
    tri = torch.maximum(torch.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy) - 0.5 * big_r
    arm = 0.38 * r
    cross = torch.minimum(
        torch.maximum(dx.abs() - r, dy.abs() - arm), torch.maximum(dx.abs() - arm, dy.abs() - r)
    )
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, tri, cross)))


def render(scenes: list[Scene], device: str | torch.device = "cpu") -> torch.Tensor:
    """Render scenes to float32 in [0, 1]: images (B, 3, H, W) or, if they are videos, (B, 3, F, H, W)."""
    return render_packed(pack_scenes(scenes), device)


def render_packed(packed: dict[str, np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """Draw :func:`pack_scenes` output. Anti-aliased by a one-pixel coverage ramp; objects drawn in canonical
    order (later ones on top)."""
    p = {k: torch.as_tensor(v).to(device) for k, v in packed.items()}
    frames = int(p["num_frames"])
    b, k = p["x"].shape
    t = torch.arange(frames, device=device, dtype=torch.float32).view(1, frames, 1, 1)  # (1, F, 1, 1)
    centre = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    py, px = centre.view(1, 1, IMAGE_SIZE, 1), centre.view(1, 1, 1, IMAGE_SIZE)
    # Background: flat colour; a faint checkerboard that moves with the camera when it pans (else pans are invisible).
    cam_x = p["pan"][:, 0].view(b, 1, 1, 1) * t
    cam_y = p["pan"][:, 1].view(b, 1, 1, 1) * t
    checker = ((torch.floor((px + cam_x) / 8) + torch.floor((py + cam_y) / 8)) % 2) * 2 - 1  # (B, F, H, W) ±1
    shade = 1.0 + 0.08 * checker * p["has_pan"].view(b, 1, 1, 1)
    img = p["background"].view(b, 3, 1, 1, 1) * shade.unsqueeze(1)  # (B, 3, F, H, W)
    for j in range(k):
        cx = p["x"][:, j].view(b, 1, 1, 1) + p["vx"][:, j].view(b, 1, 1, 1) * t  # (B, F, 1, 1)
        cy = p["y"][:, j].view(b, 1, 1, 1) + p["vy"][:, j].view(b, 1, 1, 1) * t
        r = p["radius"][:, j].view(b, 1, 1, 1)
        sdf = _shape_sdf(p["shape"][:, j].view(b, 1, 1, 1), px - cx, py - cy, r)  # (B, F, H, W)
        alpha = (0.5 - sdf).clamp(0.0, 1.0) * p["valid"][:, j].view(b, 1, 1, 1)
        # Stripes: diagonal bands 3 px wide, darker, attached to the object (they move with it).
        band = (torch.floor(((px - cx) + (py - cy)) / 3.0) % 2).unsqueeze(1)  # (B, 1, F, H, W)
        darken = 1.0 - 0.5 * band * p["stripe"][:, j].view(b, 1, 1, 1, 1)
        colour = p["colour"][:, j].view(b, 3, 1, 1, 1) * darken
        a = alpha.unsqueeze(1)
        img = img * (1.0 - a) + colour * a
    img = img.clamp(0.0, 1.0)
    return img if frames > 1 else img[:, :, 0]


# ------------------------------------------------------------------------------------------ labels
PROBE_SLOTS = 2  # the probe judges up to two objects


def scene_labels(scene: Scene) -> dict[str, int]:
    """Integer class labels of an image scene (or of any frame of a video) for the probe; -1 = not applicable.

    Keys: layout, position, background, and shape/colour/size for slots 0 and 1 (canonical order).
    """
    if len(scene.objects) > PROBE_SLOTS:
        raise ValueError(f"the probe judges at most {PROBE_SLOTS} objects, scene has {len(scene.objects)}")
    if scene.is_video and len(scene.objects) > 1:
        raise ValueError("probe labels for multi-object videos are not defined (objects cross each other)")
    labels = {
        "layout": LAYOUTS.index(scene.layout),
        "position": POSITIONS.index(scene.position) if scene.position else -1,
        "background": tuple(BACKGROUNDS).index(scene.background),
    }
    for slot in range(PROBE_SLOTS):
        o = scene.objects[slot] if slot < len(scene.objects) else None
        labels[f"shape{slot}"] = SHAPES.index(o.shape) if o else -1
        labels[f"colour{slot}"] = tuple(COLOURS).index(o.colour) if o else -1
        labels[f"size{slot}"] = tuple(SIZES).index(o.size) if o else -1
    return labels


PROBE_HEADS = {  # head name -> number of classes
    "layout": len(LAYOUTS),
    "position": len(POSITIONS),
    "background": len(BACKGROUNDS),
    **{f"{attr}{slot}": n for slot in range(PROBE_SLOTS)
       for attr, n in (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)))},
}


def label_arrays(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Stacked :func:`scene_labels`: one int64 array (B,) per probe head."""
    rows = [scene_labels(s) for s in scenes]
    return {k: np.array([r[k] for r in rows], dtype=np.int64) for k in PROBE_HEADS}
