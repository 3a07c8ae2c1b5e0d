"""Export a trained run to ONNX or TorchScript for deployment without mtpsl.

The exported graph takes images ``float32 [B,3,H,W]`` in [0, 1] (B is dynamic; ONNX files
take any H, W where the model does, checked at export, TorchScript ones the run's training
size) and returns one tensor per task, in task order, already activated
(segmentation log-probabilities, depth, unit normals, saliency/edge sigmoid probabilities)
exactly like ``ModelOutput.preds``.

Task names, types, channels, activations, class names and colours (where the checkpoint's
model card records them) and the input size travel with the file: ONNX output
names are the task names and the model's metadata holds ``mtpsl`` (JSON); TorchScript files
carry the same JSON as the extra file ``mtpsl.json``; both formats also get a sidecar
``<file>.json``. A task's ``activation`` is read off the task itself (:func:`activation_name`
probes ``Task.activate``), so a new task type cannot be mislabelled.

SegNet decodes with ``MaxUnpool2d``, which ``torch.jit.trace`` cannot record (its output-size
check needs Python ints). Exports therefore swap every unpooling layer, in a copy of the
model, for :class:`ScatterUnpool2d`, which scatters into zeros through the same flat indices
and gives identical values; ONNX sees a plain ``ScatterElements``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.errors import MtpslError
from mtpsl.core.files import atomic_write, encoded, write_text
from mtpsl.inference.load import LoadedRun, load_run, require_finite_outputs
from mtpsl.inference.predict import run_input_size
from mtpsl.tasks import Task, task_kind

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
META_KEY = "mtpsl"


class ScatterUnpool2d(nn.Module):
    """Export-friendly ``MaxUnpool2d``: scatter each value to its flat pooling index.

    ``MaxPool2d(return_indices=True)`` indices are flat positions within each output
    ``H x W`` plane, so scattering along the flattened plane of a zero map reproduces
    ``max_unpool2d`` exactly. Same call signature as ``nn.MaxUnpool2d``.
    """

    def __init__(self, kernel_size=2, stride=None, padding=0) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)

    def forward(
        self, x: Tensor, indices: Tensor, output_size: Sequence[int] | None = None
    ) -> Tensor:
        b, c, h, w = x.shape
        if output_size is None:
            height = (h - 1) * self.stride[0] - 2 * self.padding[0] + self.kernel_size[0]
            width = (w - 1) * self.stride[1] - 2 * self.padding[1] + self.kernel_size[1]
        else:
            height, width = output_size[-2], output_size[-1]
        out = x.new_zeros((b, c, height * width))
        out = out.scatter(2, indices.flatten(2), x.flatten(2))
        return out.view(b, c, height, width)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, no grads) with every MaxUnpool2d made exportable."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxUnpool2d):
                setattr(module, name,
                        ScatterUnpool2d(child.kernel_size, child.stride, child.padding))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else \
        (int(value), int(value))


class ExportWrapper(nn.Module):
    """images ``[B,3,H,W]`` -> tuple of activated per-task predictions in ``task_names`` order."""

    def __init__(self, model: nn.Module, task_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.task_names = tuple(task_names)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        preds = self.model(images).preds
        return tuple(preds[name] for name in self.task_names)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
    "log_softmax": lambda x: F.log_softmax(x, dim=1),
    "softmax": lambda x: F.softmax(x, dim=1),
    "l2_normalize": lambda x: F.normalize(x, p=2, dim=1, eps=1e-12),
}
"""Activation names the metadata may use (over the channel dim 1), each with its function."""


def activation_name(task: Task) -> str:
    """The name in :data:`ACTIVATIONS` of the function ``task.activate`` computes, found by
    applying both to fixed random logits; ``"custom"`` when none matches.

    Probing the task, rather than mapping class names, keeps the metadata right for subclasses
    and for task types added later.
    """
    gen = torch.Generator().manual_seed(0)
    raw = 3.0 * torch.randn(2, max(task.out_channels, 1), 3, 4, generator=gen)
    with torch.no_grad():
        out = task.activate(raw)
        for name, fn in ACTIVATIONS.items():
            ref = fn(raw)
            if ref.shape == out.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-6):
                return name
    return "custom"


def export_metadata(loaded: LoadedRun, input_size: tuple[int, int]) -> dict:
    """What a consumer needs to interpret the outputs (written next to / inside the file)."""
    return {
        "format_version": 1,
        "input": {"name": "image", "shape": ["batch", 3, *input_size], "dtype": "float32",
                  "range": [0.0, 1.0]},
        "tasks": [
            {"name": name, "type": type(task).__name__, "kind": task_kind(task),
             "channels": task.out_channels, "activation": activation_name(task),
             **_class_info(loaded.card, name)}
            for name, task in loaded.tasks.items()
        ],
        "input_size": list(input_size),
        "epoch": loaded.epoch,
        "checkpoint": str(loaded.checkpoint),
    }


def _class_info(card: dict | None, name: str) -> dict:
    """The task's class names and colours from the run's model card, where it records them."""
    entry: dict = next(
        (t for t in (card or {}).get("tasks", []) if t.get("name") == name), {})
    return {k: entry[k] for k in ("class_names", "colours") if entry.get(k) is not None}


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    opset: int = 17,
    root: str | None = None,
) -> Path:
    """Export the run in folder ``run``; return the written model file."""
    if fmt not in FORMATS:
        raise MtpslError(f"unknown export format {fmt!r}; formats: {list(FORMATS)}")
    loaded = load_run(run, root=root, device="cpu")
    size = run_input_size(loaded)
    names = list(loaded.tasks)
    wrapper = ExportWrapper(exportable(loaded.model), names).eval()
    example = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a diverged model is not exported (its file would serve NaN)
        outputs = dict(zip(names, wrapper(example), strict=True))
    require_finite_outputs(outputs, f"{loaded.checkpoint} (an example input of "
                                    f"{size[0]}x{size[1]})")
    meta = export_metadata(loaded, size)
    path = Path(out) if out else Path(run) / f"model{SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx_any_size(wrapper, example, names, path, opset, meta)
    else:
        _export_torchscript(wrapper, example, path, meta)
    meta["format"] = fmt
    meta["file"] = path.name
    write_text(f"{path}.json", json.dumps(meta, indent=2) + "\n")
    return path


def _export_onnx_any_size(wrapper: nn.Module, example: Tensor, names: list[str], path: Path,
                          opset: int, meta: dict) -> None:
    """An ONNX file whose height and width are dynamic where the model allows it, else one of
    the training size; ``meta["input"]`` says which and why.

    "Allows it" is checked, not assumed: the exported graph is run (onnxruntime) at a second
    size and must give what PyTorch gives there; a model that cannot take that size, a
    graph the exporter cannot make dynamic, or one that traced a size as a constant falls
    back to the training size.
    """
    height, width = example.shape[-2:]
    other = example.new_empty(1, 3, height + STRIDE_PROBE, width + STRIDE_PROBE).uniform_()
    why = "height and width are dynamic (checked at a second size against PyTorch)"
    try:
        _export_onnx(wrapper, example, names, path, opset, meta, dynamic_size=True)
        problem = _differs_at(path, wrapper, other)
    except MtpslError as err:
        problem = str(err)
    if problem is None:
        meta["input"].update(shape=["batch", 3, "height", "width"], dynamic_size=True, note=why)
        _set_metadata(path, meta)
    else:
        meta["input"].update(dynamic_size=False,
                             note=f"fixed at the training size: at other sizes {problem}")
        _export_onnx(wrapper, example, names, path, opset, meta)


def _set_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == META_KEY)
    entry.value = json.dumps(meta)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


STRIDE_PROBE = 32
"""The second size of the dynamic-size check: the training size plus this (a multiple of every
shipped model's total stride, so a model that takes any multiple of its stride passes)."""


def _differs_at(path: Path, wrapper: nn.Module, x: Tensor) -> str | None:
    """None if the ONNX file at ``path`` gives what ``wrapper`` gives for ``x``, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "unchecked (onnxruntime is not installed)"
    try:
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(x)]
    except Exception as err:  # the model itself cannot take the size
        return f"the model fails ({type(err).__name__})"
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})
    except Exception as err:
        return f"the exported graph fails ({type(err).__name__})"
    for name, g, e in zip(session.get_outputs(), got, expected, strict=True):
        if g.shape != e.shape or not np.allclose(g, e, atol=1e-4, rtol=1e-4):
            return f"the exported graph's {name.name} differs from PyTorch's"
    return None


def _export_onnx(wrapper: nn.Module, example: Tensor, names: list[str], path: Path, opset: int,
                 meta: dict, dynamic_size: bool = False) -> None:
    """Opset < 18: the TorchScript-based exporter (torch.export's cannot emit them); 18 and
    up: the torch.export-based one (needs onnxscript). Batch is a dynamic axis either way,
    height and width too with ``dynamic_size``."""
    try:
        import onnx
    except ImportError:
        raise MtpslError("ONNX export needs the 'export' extra: pip install 'mtpsl[export]'") \
            from None
    if opset < 7:
        raise MtpslError(f"--opset {opset} is too old; use 17 or newer")
    kwargs: dict = {"input_names": ["image"], "output_names": names, "opset_version": opset}
    if opset >= 18:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise MtpslError("ONNX export at opset >= 18 needs onnxscript: "
                             "pip install 'mtpsl[export]'") from None
        dims = {0: torch.export.Dim("batch", min=1)}
        if dynamic_size:
            auto = getattr(torch.export.Dim, "AUTO", None)
            if auto is None:
                raise MtpslError(f"torch {torch.__version__} cannot export them (no Dim.AUTO)")
            dims.update({2: auto, 3: auto})
        kwargs.update(dynamo=True, verbose=False, dynamic_shapes={"images": dims})
    else:
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
        kwargs.update(dynamo=False, verbose=False,
                      dynamic_axes={n: axes for n in ["image", *names]})
    tmp = path.with_name(path.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings(), _silent_stdout_fd():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(tmp), **kwargs)
        model = onnx.load(str(tmp))
    except MtpslError:
        raise
    except Exception as err:  # exporter failures are long internal traces
        hint = "; --opset 18 uses the torch.export-based exporter" if opset < 18 else ""
        raise MtpslError(f"ONNX export (opset {opset}) failed: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from err
    finally:
        tmp.unlink(missing_ok=True)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


@contextlib.contextmanager
def _silent_stdout_fd() -> Iterator[None]:
    """Discard what is written to file descriptor 1 meanwhile.

    On a failure the TorchScript-based ONNX exporter prints its whole graph (often 100s of
    kB) to the C-level stdout, whatever ``verbose`` says (torch 2.9 checks the function object
    of ``_jit_is_onnx_log_enabled``, always truthy); the one-line error says what failed.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _export_torchscript(wrapper: nn.Module, example: Tensor, path: Path, meta: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, (example,), strict=False, check_trace=False)
    # in memory first: torch's C++ writer aborts the process on a full disk (issue 28)
    data = encoded(lambda f: torch.jit.save(traced, f,
                                            _extra_files={f"{META_KEY}.json": json.dumps(meta)}))
    atomic_write(path, lambda f: f.write(data))


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported TorchScript file and its embedded metadata."""
    extra = {f"{META_KEY}.json": ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[f"{META_KEY}.json"] or "{}")
