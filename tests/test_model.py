"""StreamModel files: faithful round trips, a stable version, and clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from stream_lstm.engine import Events, step, views
from stream_lstm.exceptions import CheckpointError, ModelError
from stream_lstm.memories import Memories, Shape
from stream_lstm.model import StreamModel, resolve_device


def make_model(seed: int = 0, *, head: bool = True) -> StreamModel:
    torch.manual_seed(seed)
    lstm = nn.LSTM(4, 8, 2)
    if not head:
        return StreamModel.from_torch(lstm)
    return StreamModel.from_torch(lstm, nn.Linear(8, 3), labels=["cat", "dog", "wolf"])


def zeros(entities: int, layers: int, hidden: int) -> Memories:
    return Memories.zeros([f"e{k}" for k in range(entities)], Shape(2, layers, hidden))


def predict(model: StreamModel) -> torch.Tensor:
    torch.manual_seed(99)
    events = Events(torch.tensor([0, 1, 0]), torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))
    return step(model, events, *views(zeros(2, 2, 8))).output


def test_save_load_gives_identical_outputs_and_version(tmp_path: Path) -> None:
    model = make_model()
    model.save(tmp_path / "model.pt")
    loaded = StreamModel.load(tmp_path / "model.pt", device="cpu")
    assert loaded.version == model.version
    assert torch.equal(predict(loaded), predict(model))
    assert (loaded.input_size, loaded.hidden_size, loaded.num_layers) == (4, 8, 2)
    assert loaded.labels == ("cat", "dog", "wolf")
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"], "save leaves no temporary file"


def test_softmax_is_the_default_with_labels_identity_without() -> None:
    with_labels = predict(make_model())
    torch.testing.assert_close(with_labels.sum(dim=1), torch.ones(3))
    assert make_model(head=False).config.activation == "identity"


def test_sigmoid_activation() -> None:
    torch.manual_seed(0)
    model = StreamModel.from_torch(nn.LSTM(4, 8, 2), nn.Linear(8, 3), activation="sigmoid")
    out = predict(model)
    assert ((out > 0) & (out < 1)).all()
    assert not torch.allclose(out.sum(dim=1), torch.ones(3))


def test_one_changed_weight_changes_the_version() -> None:
    torch.manual_seed(0)
    lstm, head = nn.LSTM(4, 8, 2), nn.Linear(8, 3)
    before = StreamModel.from_torch(lstm, head).version
    assert StreamModel.from_torch(lstm, head).version == before
    with torch.no_grad():
        lstm.weight_hh_l1[3, 5] += 1e-3
    assert StreamModel.from_torch(lstm, head).version != before


def test_config_is_part_of_the_version() -> None:
    torch.manual_seed(0)
    lstm, head = nn.LSTM(4, 8, 2), nn.Linear(8, 3)
    assert (
        StreamModel.from_torch(lstm, head, activation="sigmoid").version
        != StreamModel.from_torch(lstm, head, activation="identity").version
    )


def test_version_is_the_same_in_another_process(tmp_path: Path) -> None:
    model = make_model(seed=7)
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        from stream_lstm.model import StreamModel
        torch.manual_seed(7)
        lstm = nn.LSTM(4, 8, 2)
        print(StreamModel.from_torch(lstm, nn.Linear(8, 3), labels=["cat", "dog", "wolf"]).version)
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == model.version


def test_version_of_fixed_weights_is_pinned() -> None:
    """Any change to the hash breaks every stored memory's namespace: this pin makes it loud."""
    lstm = nn.LSTM(2, 3)
    with torch.no_grad():
        for k, p in enumerate(lstm.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / (k + 10))
    assert StreamModel.from_torch(lstm).version == "9df6ffa65c4b977f"


def test_batch_first_and_float64_models_load_without_conversion() -> None:
    torch.manual_seed(3)
    lstm = nn.LSTM(4, 8, 2, batch_first=True).double()
    model = StreamModel.from_torch(lstm)
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        want = lstm(x)[0][0, -1].float()
    events = Events(
        torch.zeros(5, dtype=torch.int64), x[0].float(), torch.zeros(5, dtype=torch.bool)
    )
    got = step(model, events, *views(zeros(1, 2, 8))).output[-1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StreamModel.from_torch(nn.LSTM(2, 3, bidirectional=True)), "bidirectional"),
        (lambda: StreamModel.from_torch(nn.LSTM(2, 3, proj_size=2)), "proj_size"),
        (lambda: StreamModel.from_torch(nn.GRU(2, 3)), "torch.nn.LSTM"),  # type: ignore[arg-type]
        (
            lambda: StreamModel.from_torch(nn.LSTM(2, 3), nn.Linear(3, 2), labels=["a"]),
            "1 labels for 2",
        ),
        (lambda: StreamModel.from_torch(nn.LSTM(2, 3), activation="relu"), "activation"),  # type: ignore[arg-type]
    ],
)
def test_unsupported_models_are_refused(build: object, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build()  # type: ignore[operator]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        StreamModel.load(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        StreamModel.load(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        StreamModel.load(path)


def test_bare_state_dict_is_foreign(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(nn.LSTM(2, 3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"bare state_dict.*StreamModel\.from_torch"):
        StreamModel.load(path)


def test_a_saved_file_records_its_cell(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    assert torch.load(path, weights_only=True)["cell"] == "lstm"


def test_a_file_of_an_earlier_build_without_a_cell_loads_as_an_lstm(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "model.pt"
    model.save(path)
    blob = torch.load(path, weights_only=True)
    del blob["cell"]
    torch.save(blob, path)
    loaded = StreamModel.load(path, device="cpu")
    assert loaded.version == model.version
    assert torch.equal(predict(loaded), predict(model))


def test_a_file_of_another_cell_is_refused_naming_the_file_and_the_cell(tmp_path: Path) -> None:
    path = tmp_path / "other-cell.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "cell": "gru"}, path)
    with pytest.raises(CheckpointError, match=r"other-cell\.pt.*'gru' cell") as error:
        StreamModel.load(path)
    assert "lstm" in str(error.value)


@pytest.mark.parametrize(("layers", "hidden"), [(2, 8), (1, 3), (3, 5)])
def test_the_model_declares_its_states_and_their_shape(layers: int, hidden: int) -> None:
    assert StreamModel.states == ("ltm", "stm")
    model = StreamModel.from_torch(nn.LSTM(4, hidden, layers))
    assert model.states == ("ltm", "stm")
    assert model.shape == Shape(2, layers, hidden)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        StreamModel.load(path)


def test_tampered_weights_do_not_match_the_recorded_version(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["weight_ih_l0"][0, 0] += 1.0
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="do not hash to the version"):
        StreamModel.load(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "8", "hidden_size must be an integer"),
        ("hidden_size", 8.0, "hidden_size must be an integer"),
        ("input_size", True, "input_size must be an integer"),
        ("num_layers", 0, "num_layers must be an integer from 1"),
        ("hidden_size", 10**9, "hidden_size must be an integer from 1"),
        ("output_size", "3", "output_size must be"),
        ("bias", "yes", "bias must be true or false"),
        ("activation", ["softmax"], "activation must be one of"),
        ("labels", [1, 2, 3], "labels must be"),
        ("labels", "cat", "labels must be"),
    ],
)
def test_a_config_of_the_wrong_type_or_size_is_refused_before_anything_is_allocated(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    blob["config"][field] = value
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=message):
        StreamModel.load(path)


def test_a_model_too_large_to_serve_is_refused_before_allocating(tmp_path: Path) -> None:
    """8 layers of hidden 60,000 is 230 billion parameters: a file could ask for it."""
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    blob["config"] |= {"hidden_size": 60_000, "num_layers": 8}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="parameters"):
        StreamModel.load(path)


@pytest.mark.parametrize("config", [None, [1, 2], "config"])
def test_a_config_that_is_no_mapping_is_refused(tmp_path: Path, config: object) -> None:
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "config": config}, path)
    with pytest.raises(CheckpointError, match="incomplete or damaged"):
        StreamModel.load(path)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {_Exploit.marker}",))

    marker = ""


def test_file_that_pickles_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    path = tmp_path / "model.pt"
    make_model().save(path)
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "payload": _Exploit()}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match="pickles code"):
        StreamModel.load(path)
    assert not marker.exists()


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
