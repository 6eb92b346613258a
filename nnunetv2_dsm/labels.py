"""The DSM label space: 45 multi-label classes, their integer encoding and the nnU-Net regions that decode it.

Targets are multi-label: an organ's mask contains its tumors (a liver tumor voxel is also liver), and a tumor
of a paired organ (kidney, adrenal gland, lung) belongs to the side it sits in. nnU-Net stores one integer per
voxel, so every voxel's multi-hot vector is written as one integer:

* ``0``            background,
* ``1 .. 25``      organ k and nothing else (the class index itself),
* ``26 ..``        a *composite* label "tumor t inside host organ h" for every host h of t, plus
                   "tumor t, host not annotated" (e.g. MSD lung: lung tumors, but no lung mask).

dataset.json declares each of the 45 classes as an nnU-Net region: the tuple of integers whose voxels belong to it
(an organ's region holds the organ label and every composite label hosted by it). nnU-Net turns the integer map
into 45 binary channels with ``ConvertSegmentationToRegionsTransform``; :func:`decode` does the same in numpy.
:func:`encode` is its exact inverse on valid multi-hot vectors (tested for every class and host).

Indices follow ``CLASS_NAMES``: class ``CLASS_NAMES[i]`` has index ``i + 1`` and network channel ``i``.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

CLASS_NAMES: Tuple[str, ...] = (
    # organs 1-25
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Aorta", "Postcava",
    "Portal Vein and Splenic Vein", "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland", "Duodenum",
    "Hepatic Vessel", "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum", "Bladder", "Prostate",
    "Left Head of Femur", "Right Head of Femur", "Celiac Truck",
    # tumors 26-45
    "Spleen Tumor", "Kidney Tumor", "Kidney Cyst", "Gall Bladder Tumor", "Esophagus Tumor", "Liver Tumor",
    "Stomach Tumor", "Aortic Tumor", "Postcava Tumor Thrombus", "Portal Vein Tumor Thrombus", "Pancreas Tumor",
    "Adrenal Tumor", "Adrenal Cyst", "Duodenal Tumor", "Hepatic Vessel Tumor", "Lung Tumor", "Lung Cyst",
    "Colon Tumor", "Small Intestinal Neoplasm", "Rectal Tumor",
)
NUM_CLASSES = len(CLASS_NAMES)
NUM_ORGANS = 25
NUM_TUMORS = NUM_CLASSES - NUM_ORGANS
ORGAN_NAMES: Tuple[str, ...] = CLASS_NAMES[:NUM_ORGANS]
TUMOR_NAMES: Tuple[str, ...] = CLASS_NAMES[NUM_ORGANS:]

# Host organ(s) of each tumor, by name. Paired organs list both sides. "Hepatic Vessel Tumor" (MSD Task08) is
# hosted by the liver: those lesions lie in the liver parenchyma, not inside the vessel masks.
TUMOR_HOSTS: Dict[str, Tuple[str, ...]] = {
    "Spleen Tumor": ("Spleen",),
    "Kidney Tumor": ("Right Kidney", "Left Kidney"),
    "Kidney Cyst": ("Right Kidney", "Left Kidney"),
    "Gall Bladder Tumor": ("Gall Bladder",),
    "Esophagus Tumor": ("Esophagus",),
    "Liver Tumor": ("Liver",),
    "Stomach Tumor": ("Stomach",),
    "Aortic Tumor": ("Aorta",),
    "Postcava Tumor Thrombus": ("Postcava",),
    "Portal Vein Tumor Thrombus": ("Portal Vein and Splenic Vein",),
    "Pancreas Tumor": ("Pancreas",),
    "Adrenal Tumor": ("Right Adrenal Gland", "Left Adrenal Gland"),
    "Adrenal Cyst": ("Right Adrenal Gland", "Left Adrenal Gland"),
    "Duodenal Tumor": ("Duodenum",),
    "Hepatic Vessel Tumor": ("Liver",),
    "Lung Tumor": ("Right Lung", "Left Lung"),
    "Lung Cyst": ("Right Lung", "Left Lung"),
    "Colon Tumor": ("Colon",),
    "Small Intestinal Neoplasm": ("Intestine",),
    "Rectal Tumor": ("Rectum",),
}

# Organs that come as a left/right pair; converters split a single "both sides" label into these by position.
LATERAL_PAIRS: Dict[str, Tuple[str, str]] = {
    "Kidney": ("Right Kidney", "Left Kidney"),
    "Adrenal Gland": ("Right Adrenal Gland", "Left Adrenal Gland"),
    "Lung": ("Right Lung", "Left Lung"),
    "Head of Femur": ("Right Head of Femur", "Left Head of Femur"),
}


class UnknownClassError(KeyError):
    """A class name that is not one of the 45 of ``CLASS_NAMES``."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def class_index(name: str) -> int:
    """1-based index of a class name (exact spelling of ``CLASS_NAMES``; case and surrounding blanks ignored)."""
    key = name.strip().lower()
    for i, n in enumerate(CLASS_NAMES):
        if n.lower() == key:
            return i + 1
    close = difflib.get_close_matches(name, CLASS_NAMES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownClassError(f"{name!r} is not one of the 45 DSM classes (nnunetv2_dsm.labels.CLASS_NAMES).{hint}")


def class_name(index: int) -> str:
    """Class name of a 1-based class index."""
    if not 1 <= index <= NUM_CLASSES:
        raise ValueError(f"class index {index} outside 1..{NUM_CLASSES}")
    return CLASS_NAMES[index - 1]


def _build_composites() -> Dict[Tuple[int, Optional[int]], int]:
    """(tumor index, host index or None) -> the integer label that encodes it, counted up after the organs."""
    table, value = {}, NUM_ORGANS + 1
    for tumor in TUMOR_NAMES:
        for host in TUMOR_HOSTS[tumor] + (None,):
            table[(class_index(tumor), None if host is None else class_index(host))] = value
            value += 1
    return table


# (tumor index, host index or None) -> integer label
COMPOSITE_LABELS: Dict[Tuple[int, Optional[int]], int] = _build_composites()
MAX_LABEL = max(COMPOSITE_LABELS.values())
LABEL_DTYPE = np.uint8
assert MAX_LABEL <= np.iinfo(LABEL_DTYPE).max

# integer label -> (organ index or None, tumor index or None)
_VALUE_MEANING: Dict[int, Tuple[Optional[int], Optional[int]]] = {0: (None, None)}
_VALUE_MEANING.update({k: (k, None) for k in range(1, NUM_ORGANS + 1)})
_VALUE_MEANING.update({v: (host, t) for (t, host), v in COMPOSITE_LABELS.items()})


def tumor_label(tumor: str, host: Optional[str] = None) -> int:
    """Integer written for a voxel of ``tumor`` inside ``host`` (None: the host organ is not annotated)."""
    t = class_index(tumor)
    if t <= NUM_ORGANS:
        raise ValueError(f"{tumor!r} is an organ, not a tumor")
    h = None if host is None else class_index(host)
    if (t, h) not in COMPOSITE_LABELS:
        raise ValueError(f"{host!r} is not a host organ of {tumor!r}; hosts are {TUMOR_HOSTS[class_name(t)]}")
    return COMPOSITE_LABELS[(t, h)]


def label_meaning(value: int) -> Tuple[Optional[str], Optional[str]]:
    """(organ name or None, tumor name or None) of an integer label."""
    if int(value) not in _VALUE_MEANING:
        raise ValueError(f"label value {value} is not part of the DSM encoding (0..{MAX_LABEL})")
    organ, tumor = _VALUE_MEANING[int(value)]
    return (None if organ is None else class_name(organ), None if tumor is None else class_name(tumor))


def region_values(index: int) -> Tuple[int, ...]:
    """All integer labels whose voxels belong to class ``index`` (1-based), sorted."""
    return tuple(sorted(v for v, (organ, tumor) in _VALUE_MEANING.items() if index in (organ, tumor)))


def _decode_lut() -> np.ndarray:
    """(MAX_LABEL + 1, 45) bool table: row v is the multi-hot of integer label v."""
    lut = np.zeros((MAX_LABEL + 1, NUM_CLASSES), dtype=bool)
    for value, (organ, tumor) in _VALUE_MEANING.items():
        for idx in (organ, tumor):
            if idx is not None:
                lut[value, idx - 1] = True
    return lut


_DECODE_LUT = _decode_lut()


def decode(label_map: np.ndarray) -> np.ndarray:
    """Integer label map (any shape S) -> multi-hot (45, *S) bool, exactly as nnU-Net's regions decode it."""
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() > MAX_LABEL):
        bad = np.unique(label_map[(label_map < 0) | (label_map > MAX_LABEL)])[:5]
        raise ValueError(f"label values {bad.tolist()} are not part of the DSM encoding (0..{MAX_LABEL})")
    return np.moveaxis(_DECODE_LUT[label_map.astype(np.int64)], -1, 0)


def encode(multi_hot: np.ndarray) -> np.ndarray:
    """Multi-hot (45, *S) -> integer label map (*S) of ``LABEL_DTYPE``; the inverse of :func:`decode`.

    A voxel may carry at most one organ and at most one tumor, and a tumor voxel's organ must be one of that
    tumor's hosts (or absent, meaning "host not annotated"). Anything else raises ``ValueError``.
    """
    multi_hot = np.asarray(multi_hot).astype(bool)
    if multi_hot.shape[0] != NUM_CLASSES:
        raise ValueError(f"multi-hot must have {NUM_CLASSES} channels first, got shape {multi_hot.shape}")
    organs, tumors = multi_hot[:NUM_ORGANS], multi_hot[NUM_ORGANS:]
    for part, what in ((organs, "organs"), (tumors, "tumors")):
        if (part.sum(0) > 1).any():
            raise ValueError(f"{int((part.sum(0) > 1).sum())} voxels carry more than one of the {what}; "
                             f"the DSM encoding allows one organ and one tumor per voxel")
    out = np.zeros(multi_hot.shape[1:], dtype=LABEL_DTYPE)
    organ_of = np.where(organs.any(0), organs.argmax(0) + 1, 0)
    out[organ_of > 0] = organ_of[organ_of > 0]
    tumor_of = np.where(tumors.any(0), tumors.argmax(0) + NUM_ORGANS + 1, 0)
    for t in np.unique(tumor_of[tumor_of > 0]):
        in_t = tumor_of == t
        for host in np.unique(organ_of[in_t]):
            key = (int(t), None if host == 0 else int(host))
            if key not in COMPOSITE_LABELS:
                raise ValueError(f"{int((in_t & (organ_of == host)).sum())} voxels of {class_name(int(t))!r} lie in "
                                 f"{class_name(int(host))!r}, which is not one of its hosts "
                                 f"{TUMOR_HOSTS[class_name(int(t))]}")
            out[in_t & (organ_of == host)] = COMPOSITE_LABELS[key]
    return out


def regions_class_order() -> List[int]:
    """The integer nnU-Net writes for each region when it turns probabilities into one label map.

    Organs write their own label. A tumor with a single host writes "tumor inside that host", so the stock label
    map keeps the tumor inside its organ. A tumor of a paired organ writes "tumor, host not encoded": which
    side it lies in cannot be chosen by one fixed integer; the 45 probability channels (``--save_probabilities``)
    keep the full multi-label answer.
    """
    order = list(range(1, NUM_ORGANS + 1))
    for tumor in TUMOR_NAMES:
        hosts = TUMOR_HOSTS[tumor]
        order.append(tumor_label(tumor, hosts[0] if len(hosts) == 1 else None))
    return order


def dataset_json_labels() -> Dict[str, object]:
    """dataset.json ``labels``: background plus the 45 classes as regions, in class order."""
    labels: Dict[str, object] = {"background": 0}
    for i, name in enumerate(CLASS_NAMES, start=1):
        labels[name] = list(region_values(i))
    return labels


def multi_hot_from_classes(class_masks: Dict[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Build a (45, *shape) multi-hot from per-class boolean masks keyed by class name (masks are OR-ed)."""
    multi_hot = np.zeros((NUM_CLASSES, *shape), dtype=bool)
    for name, mask in class_masks.items():
        multi_hot[class_index(name) - 1] |= np.asarray(mask, dtype=bool)
    return multi_hot


def names_to_indices(names: Iterable[str]) -> List[int]:
    """Class names -> sorted unique 1-based indices (raises :class:`UnknownClassError` naming the bad one)."""
    return sorted({class_index(n) for n in names})
