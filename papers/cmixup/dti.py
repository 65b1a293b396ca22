"""DTI (TDC `DTI_DG_Group`, BindingDB patents by year), C-Mixup's out-of-distribution Pearson-r benchmark
(specs/cmixup.md §3): the authors' data files, read safely, and the official encoder, registered into timm as
`dti_encoder`.

Data: the official run (`main.sh`: `--dataset Dti_dg --data_dir ./data/dti`, `config.py` 'Dti_dg' `read_dataset 1`)
does not rebuild the data: `src/data/dti_dg.py` `read_dti_sub_dataset` loads four pickles the authors built once
from TDC's BindingDB_Patent with DomainBed's loaders (`sub_sample_batch_max_num 100`: at most 100 batches of 64
per year; train = years 2013-2018 (80% of each, the 20% holdout = validation), test = 2019 and 2020) and shipped on
their Google Drive (`dti/`): `DTI_sub100_{train,valid,test,test_assay_list}.pkl`, each `pickle.dump((x, y))` of
torch tensors. `x` is one row per drug-target pair: the one-hot SMILES `(63, 100)` then the one-hot protein
`(26, 1000)`, flattened (32,300 floats); `y` the affinity `(N, 1)`; `test_assay_list` holds the test rows per year
(lists of tensors), the domains of the worst-domain r. They go in `$REPRO_DATA_DIR/dti/` (or `data.root`).

Reading: a pickle can run code, so these are read with an unpickler that admits only what `pickle.dump` of a
tensor writes (`torch._utils._rebuild_tensor_v2`, `collections.OrderedDict`, and the storage bytes, which are
loaded with `torch.load(weights_only=True)`); anything else is refused with one error line.

Splits: train and validation as stored (training takes the batches in the stored order every epoch, `is_ood`);
test = the per-year lists concatenated, with the year as the domain (the official pooled test is the same rows in
another order, evaluated in batches of 64 with the last partial batch dropped; we evaluate every row).

Model (`src/models.py` `Learner_Dti_dg`, `Dti_dg_lib/networks.py` `DTI_Encoder`, `CNN`): per input a 3-layer Conv1d
stack with ReLU in float64 (drug 63 -> 32 -> 64 -> 96, kernels 4, 6, 8; protein 26 -> 32 -> 64 -> 96, kernels 4,
8, 12), global max pool, `Linear(96, 256)` in float32; the two 256-d codes concatenated and passed through three
linear layers 512 -> 256 -> 128 -> 128 with **no activation** between them (the official `predictor` loop applies
none; its dropout is never used), then `Linear(128, 1)`. Manifold mixing (`forward_mixup`): each CNN draws its own
layer `k` in {0, 1, 2} (`random.sample`, drug first), runs layers `<= k` on both inputs, mixes after layer `k`'s
ReLU and runs the rest on the mix. Here `block_1` returns every layer's state of both CNNs packed in one float64
tensor, the method mixes it, and `block_2` continues each CNN from its drawn layer: the same numbers as
`forward_mixup` (mixing is linear, the later states of the packed mix are ignored), at the cost of running all
three layers on both inputs. The layers are drawn by `draw_mixing_point(generator)` from the run's generator
(`method.py` calls it before mixing) instead of Python's `random`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.models import _entry_kwargs, register_model_once

DTI_FILES = tuple(f"DTI_sub100_{name}.pkl" for name in ("train", "valid", "test", "test_assay_list"))
DRUG_SHAPE, PROTEIN_SHAPE = (63, 100), (26, 1000)  # Learner_Dti_dg.input_shape: one-hot SMILES, one-hot protein
CNN_LAYERS = {"drug": ((63, 32, 4), (32, 64, 6), (64, 96, 8)), "protein": ((26, 32, 4), (32, 64, 8), (64, 96, 12))}
_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}


def _storage_from_bytes(data: bytes):
    """What `torch.storage._load_from_bytes` does, with `weights_only=True` (no code in the storage bytes)."""
    return torch.load(io.BytesIO(data), weights_only=True)


class _TensorUnpickler(pickle.Unpickler):
    """Admits only the globals `pickle.dump` of plain CPU tensors writes."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _TENSOR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a pickled tensor")


def read_tensor_pickle(path: Path):
    """`pickle.load` of a file of tensors (lists / tuples of them), refusing anything that is not one."""
    try:
        with open(path, "rb") as fh:
            return _TensorUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as err:
        raise ReproError(f"cannot read {path} as pickled tensors ({err}); re-copy it from the C-Mixup data "
                         "folder (dti/).") from err


def dti_splits(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`{'train' | 'valid' | 'test': (x (N, 32300) float32, y (N, 1) float32, domain (N,) int64)}` from the four
    files; test = the per-year lists concatenated, domain = the list index (0: 2019, 1: 2020)."""
    packets = {name: read_tensor_pickle(folder / file) for name, file in zip(("train", "valid", "test", "assay"),
                                                                              DTI_FILES, strict=True)}
    width = DRUG_SHAPE[0] * DRUG_SHAPE[1] + PROTEIN_SHAPE[0] * PROTEIN_SHAPE[1]
    splits = {}
    for name in ("train", "valid"):
        x, y = _pair(packets[name], folder / f"DTI_sub100_{name}.pkl", width)
        splits[name] = (x, y, torch.zeros(len(x), dtype=torch.int64))
    xs, ys = packets["assay"]
    if not isinstance(xs, list | tuple) or len(xs) != len(ys) or not xs:
        raise ReproError(f"{folder / DTI_FILES[3]} should hold (list of x, list of y) per test year.")
    pairs = [_pair((x, y), folder / DTI_FILES[3], width) for x, y in zip(xs, ys, strict=True)]
    x_test, _ = _pair(packets["test"], folder / DTI_FILES[2], width)
    if sum(len(x) for x, _ in pairs) != len(x_test):
        raise ReproError(f"{folder}: the test years hold {sum(len(x) for x, _ in pairs)} rows but "
                         f"DTI_sub100_test.pkl {len(x_test)}; the files are not one set, re-copy all four.")
    splits["test"] = (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]),
                      torch.cat([torch.full((len(x),), k, dtype=torch.int64) for k, (x, _) in enumerate(pairs)]))
    return splits


def _pair(packet, path: Path, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(packet, tuple | list) and len(packet) == 2 and all(torch.is_tensor(t) for t in packet)):
        raise ReproError(f"{path} should hold a pickled (x, y) pair of tensors.")
    x, y = packet
    x, y = x.float().reshape(len(x), -1), y.float().reshape(len(y), -1)
    if x.shape[1] != width or len(x) != len(y) or y.shape[1] != 1:
        raise ReproError(f"{path}: x {tuple(x.shape)} and y {tuple(y.shape)}; expected (N, {width}) one-hot drug + "
                         "protein rows and (N, 1) affinities.")
    return x, y


# ---------------------------------------------------------------------------------------------------- model
class SequenceCNN(nn.Module):
    """`networks.CNN`: three Conv1d + ReLU in float64, global max pool, `Linear(96, 256)` in float32."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv = nn.ModuleList([nn.Conv1d(i, o, k) for i, o, k in CNN_LAYERS[kind]]).double()
        self.fc1 = nn.Linear(CNN_LAYERS[kind][-1][1], 256)

    def states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x: (B, C, L). Returns: the ReLU output of every conv layer, float64."""
        out, state = [], x.double()
        for conv in self.conv:
            state = F.relu(conv(state))
            out.append(state)
        return out

    def resume(self, state: torch.Tensor, layer: int) -> torch.Tensor:
        """Continue from the output of conv `layer`: the later convs, max pool, `fc1`. Returns (B, 256) float32."""
        for conv in self.conv[layer + 1:]:
            state = F.relu(conv(state))
        return self.fc1(F.adaptive_max_pool1d(state, 1).flatten(1).float())


class DTIEncoder(nn.Module):
    """`Learner_Dti_dg`: drug and protein CNNs, a 3-layer linear predictor, a linear head (module docstring).

    Args:
        num_classes: output dimension (1).
    """

    def __init__(self, num_classes: int = 1):
        super().__init__()
        self.drug, self.protein = SequenceCNN("drug"), SequenceCNN("protein")
        self.predictor = nn.ModuleList([nn.Linear(a, b) for a, b in ((512, 256), (256, 128), (128, 128))])
        self.num_features = self.head_hidden_size = 128
        self.num_classes = num_classes
        self.head = nn.Linear(128, num_classes)
        self.mix_layers: tuple[int, int] | None = None  # drawn per step by draw_mixing_point

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 32300)` rows -> drug `(B, 63, 100)` and protein `(B, 26, 1000)`, as `Learner_Dti_dg.forward`."""
        n_drug = DRUG_SHAPE[0] * DRUG_SHAPE[1]
        return x[:, :n_drug].reshape(-1, *DRUG_SHAPE), x[:, n_drug:].reshape(-1, *PROTEIN_SHAPE)

    def _predict(self, drug_code: torch.Tensor, protein_code: torch.Tensor) -> torch.Tensor:
        features = torch.cat([drug_code, protein_code], 1)
        for layer in self.predictor:  # no activation between them, as the official loop
            features = layer(features)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 32300). Returns: (B, 128) predictor output."""
        drug, protein = self.split(x)
        return self._predict(self.drug.resume(self.drug.states(drug)[-1], 2),
                             self.protein.resume(self.protein.states(protein)[-1], 2))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # manifold mixing (`forward_mixup`): block_1 packs every conv state, block_2 resumes from the drawn layers
    def draw_mixing_point(self, generator: torch.Generator) -> tuple[int, int]:
        """The conv layer after which each CNN mixes, drug then protein, uniform over {0, 1, 2} (the official
        `random.sample(range(3), 1)` per CNN per `forward_mixup`), from the run's generator."""
        drawn = torch.randint(0, 3, (2,), generator=generator).tolist()
        self.mix_layers = (int(drawn[0]), int(drawn[1]))
        return self.mix_layers

    def block_1(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 32300). Returns: (B, S) float64, every conv layer's ReLU output of both CNNs, flattened."""
        drug, protein = self.split(x)
        return torch.cat([s.flatten(1) for s in self.drug.states(drug) + self.protein.states(protein)], 1)

    def block_2(self, packed: torch.Tensor) -> torch.Tensor:
        """Continue each CNN from its drawn layer's part of `packed` (from `block_1`, possibly mixed)."""
        if self.mix_layers is None:
            raise ReproError("dti_encoder's manifold path needs draw_mixing_point(generator) before block_2.")
        states, start = [], 0
        for kind, (_, length) in (("drug", DRUG_SHAPE), ("protein", PROTEIN_SHAPE)):
            for _, out_channels, kernel in CNN_LAYERS[kind]:
                length = length - kernel + 1
                states.append(packed[:, start:start + out_channels * length].reshape(-1, out_channels, length))
                start += out_channels * length
        drug_layer, protein_layer = self.mix_layers
        return self._predict(self.drug.resume(states[drug_layer], drug_layer),
                             self.protein.resume(states[3 + protein_layer], protein_layer))


@register_model_once
def dti_encoder(pretrained: bool = False, num_classes: int = 1, **kwargs: Any) -> DTIEncoder:
    """C-Mixup's DTI regressor (`Learner_Dti_dg`); `num_classes` is the output dimension (1)."""
    _entry_kwargs("dti_encoder", pretrained, kwargs, ("num_classes",))
    return DTIEncoder(num_classes)
