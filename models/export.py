"""Export an inference-form model to ONNX, TorchScript or torch.export bytes and run the file back.

``export_bytes`` writes the file in memory (``--dynamic`` batch/height/width), ``runner`` loads it with
its own runtime (onnxruntime, torch.jit.load, torch.export.load) for the check against eager eval, and
``with_metadata`` adds the preprocessing (``blocklab.*`` keys) to an ONNX file. ``python -m tools.deploy``
and ``python -m tools.predict`` use them; docs/deployment.md describes the whole path.
"""
import io
import os
import tempfile
import warnings

FORMATS = ("onnx", "torchscript", "export")
ONNX_EXPORTERS = ("legacy", "dynamo")
TOLERANCE = 1e-4


class CheckFailed(RuntimeError):
    """Export raised, or the exported file's outputs differ from eager eval; one line."""


def with_metadata(data, fmt, metadata):
    """ONNX bytes with ``metadata`` added to its metadata_props; other formats unchanged (they get a sidecar)."""
    if fmt != "onnx":
        return data
    import onnx
    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def check_shapes(batch, size, dynamic):
    """Input shapes the exported file is checked at: the export shape, and others with ``dynamic``."""
    shapes = [(batch, size, size)]
    if dynamic:
        shapes += [(batch + 1, size + 16, size + 16), (batch, size + 8, size + 32), (batch, size + 7, size - 3)]
    return shapes


def _dynamic_shapes(dynamic):
    import torch
    return ({0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},) if dynamic else None


def output_names(model, example):
    """ONNX output names: ``output`` for a classifier; ``feature_0``, ``feature_1``, ... for a features-only
    model's maps '0', '1', ... (ONNX names cannot be bare digits)."""
    import torch
    with torch.no_grad():
        out = model(example)
    return [f"feature_{k}" for k in out] if isinstance(out, dict) else ["output"]


def export_bytes(model, example, fmt, dynamic=False, onnx_exporter="legacy"):
    """The exported file's bytes."""
    import torch
    buf = io.BytesIO()
    names = output_names(model, example) if fmt == "onnx" else None  # one more forward: ONNX only
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation/tracer warnings: the check below decides
        if fmt == "torchscript":  # strict=False: a features-only model returns a dict
            torch.jit.save(torch.jit.trace(model, (example,), check_trace=False, strict=False), buf)
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic)), buf)
        elif onnx_exporter == "legacy":
            axes = None
            if dynamic:
                axes = {"input": {0: "batch", 2: "height", 3: "width"}}
                axes.update({n: {0: "batch"} if names == ["output"] else {0: "batch", 2: f"height_{n}", 3: f"width_{n}"}
                             for n in names})
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"], output_names=names,
                              dynamic_axes=axes)
        else:
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(dynamic),
                                        input_names=["input"], output_names=names, verbose=False)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                program.save(path)
                with open(path, "rb") as f:
                    buf.write(f.read())
    return buf.getvalue()


def runner(data, fmt):
    """A function running the exported bytes with the format's runtime (its outputs as the runtime gives them)."""
    import torch
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        if [o.name for o in session.get_outputs()] == ["output"]:  # a classifier (output_names)
            return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        return lambda x: [torch.from_numpy(y) for y in session.run(None, {name: x.numpy()})]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation: the user chose the format
            return torch.jit.load(io.BytesIO(data))
    return torch.export.load(io.BytesIO(data)).module()
